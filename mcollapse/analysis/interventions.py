"""Edits of the decoder's input along a subspace, and the references that say what an edit means.

For sample i with input sequence z_i (T_i, d) and a subspace with orthonormal directions U (k, d),
P = U^T U, each variant keeps z_i off the subspace and replaces its component along it:

    resample       z_i - P (z_i - a_j)      j another scored sample, a_j its sequence aligned to T_i:
                                             the sample-specific information along P is gone, the
                                             marginal distribution, position pattern and token norms stay
    position_mean  z_i - P (z_i - mu)       mu_t the mean over samples at (aligned) position t
    optimal        z_i - P z_i + U^T c      c the constant (per position for fixed-length inputs) that
                                             minimises the mean loss, fitted on other samples
    centred        z_i - P (z_i - m)        m the pooled modal mean: every position gets one value
    uncentred      z_i - P z_i              the reference script's edit

and two references: `swap` replaces the whole input by z_j (the same j as resample; Delta_swap is
all the sample-specific use of the input), `floor` sets every position to m.

Alignment for variable-length inputs (audio): position t of a length-T target takes position
round(t (T_j - 1) / (T - 1)) of sample j, nearest-neighbour in normalised time; fixed-length inputs
(image patches) align position by position.
"""

from __future__ import annotations

import numpy as np
import torch

VARIANTS = ("resample", "position_mean", "optimal", "centred", "uncentred")
REFERENCES = ("swap", "floor")
DRAWN = ("resample", "swap")  # the variants that take another sample's input, one column per draw


def aligned(z: np.ndarray, length: int) -> np.ndarray:
    """z (T, d) time-aligned to `length` positions by nearest position in normalised time."""
    z = np.asarray(z)
    if len(z) == length:
        return z
    if length == 1 or len(z) == 1:
        return np.repeat(z[:1] if length == 1 else z, length, axis=0)[:length]
    where = np.rint(np.arange(length) * (len(z) - 1) / (length - 1)).astype(int)
    return z[where]


def partners(n: int, n_draws: int, seed: int, avoid: np.ndarray | None = None) -> np.ndarray:
    """(n_draws, n) partner index j != i for every sample and draw, seeded. With `avoid` (n,) labels
    (the target text), j is drawn among samples with another label where any exists, so the swapped
    input does not carry the very answer being scored."""
    if n < 2:
        raise ValueError("another sample's input needs at least 2 scored samples")
    rng = np.random.default_rng([seed, 23])
    out = np.empty((n_draws, n), dtype=int)
    labels = np.asarray(avoid, dtype=object) if avoid is not None else None
    for i in range(n):
        pool = np.array([j for j in range(n) if j != i and (labels is None or labels[j] != labels[i])])
        if pool.size == 0:
            pool = np.array([j for j in range(n) if j != i])
        out[:, i] = rng.choice(pool, size=n_draws, replace=pool.size < n_draws)
    return out


def position_mean(arrays: list[np.ndarray], length: int) -> np.ndarray:
    """mu (length, d): the mean over samples of their inputs aligned to `length` positions."""
    return np.mean([aligned(a, length) for a in arrays], axis=0)


def edit(z: torch.Tensor, u: torch.Tensor, variant: str, *, mean: torch.Tensor | None = None,
         partner: torch.Tensor | None = None, position_means: torch.Tensor | None = None,
         constant: torch.Tensor | None = None) -> torch.Tensor:
    """The edited input of one sample (see the module docstring); `partner` is already aligned."""
    if variant == "swap":
        return partner
    if variant == "floor":
        return mean.expand_as(z).clone()
    if u.numel() == 0:
        return z
    if variant == "uncentred":
        return z - (z @ u.T) @ u
    if variant == "optimal":
        return z - (z @ u.T) @ u + constant.expand(z.shape[0], -1) @ u
    anchor = {"centred": mean, "resample": partner, "position_mean": position_means}[variant]
    return z - ((z - anchor) @ u.T) @ u


def fit_constant(score, zs: list[torch.Tensor], u: torch.Tensor, per_position: bool, init: torch.Tensor, *,
                 steps: int, batch: int, lr: float, seed: int, advance=None) -> tuple[torch.Tensor, list[float]]:
    """The constant c ((T, k) per position, else (1, k)) minimising the mean loss of the `optimal`
    edit over `zs`, by Adam on seeded mini-batches (Li & Janson's optimal ablation). `score(list of
    edited inputs, indices)` returns log q(y | z) per sample, differentiable. Starts from `init`
    (the mean's component, which is the centred edit) and returns the constant and the loss curve;
    `advance(1)` is called after each step (progress, and a Ctrl-C safe point)."""
    constant = init.clone().detach().requires_grad_(True)
    optimiser = torch.optim.Adam([constant], lr=lr)
    rng = np.random.default_rng([seed, 31])
    curve = []
    for _ in range(steps):
        rows = rng.choice(len(zs), size=min(batch, len(zs)), replace=False)
        edited = [edit(zs[r], u, "optimal", constant=constant if per_position else constant[:1]) for r in rows]
        loss = -score(edited, rows).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(float(loss.detach()))
        if advance is not None:
            advance(1)
    return constant.detach(), curve
