"""MS swap: replace a sample's own mean component in a subspace with another group's mean.

For a subspace with orthonormal rows U (k, d), projector P = U^T U, a sample's sequence z (T, d)
and a group mean mu_B (the mean pooled representation of group B's samples):

    z'_t = z_t - P zbar + P mu_B,      zbar = mean_t z_t,

so every position moves by the same shift P (mu_B - zbar): what varies across positions stays,
and the sample's location inside the subspace becomes group B's. KL(p_base || p_swap) over the
decoder's next-token distributions then says how much the decoder reads that location; dividing
by the squared shift gives the sensitivity per unit of movement, comparable across subspaces.
"""

from __future__ import annotations

import numpy as np
import torch


def swap_shift(z: torch.Tensor, modes: torch.Tensor, group_mean: torch.Tensor) -> torch.Tensor:
    """P (mu_B - zbar) (d,): the shift that moves z's subspace mean to the group mean's."""
    difference = group_mean - z.mean(dim=0)
    return (difference @ modes.T) @ modes


def kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) (N,) between rows of log-probabilities (N, V), in nats."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0.0)


def draw_partners(groups: list[str], n_draws: int, seed: int) -> list[list[str]]:
    """For each sample, `n_draws` other groups drawn uniformly (distinct while enough exist)."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError(f"a swap needs at least 2 groups, found {len(names)}")
    rng = np.random.default_rng(seed)
    out = []
    for own in groups:
        others = [g for g in names if g != own]
        replace = n_draws > len(others)
        out.append([others[i] for i in rng.choice(len(others), size=n_draws, replace=replace)])
    return out
