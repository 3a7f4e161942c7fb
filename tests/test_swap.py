"""MS swap math on planted ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcollapse.analysis.swap import draw_partners, kl_per_position, swap_shift, swap_to_group


def test_swap_moves_only_the_subspace_mean_to_the_group_mean():
    d, T = 10, 6
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    modes, rest = q.T[:3], q.T[3:]
    z = torch.randn(T, d, generator=gen, dtype=torch.float64)
    mu_b = torch.randn(d, generator=gen, dtype=torch.float64)
    swapped = swap_to_group(z, modes, mu_b)
    torch.testing.assert_close(swapped.mean(0) @ modes.T, mu_b @ modes.T)  # now at B's place in the subspace
    torch.testing.assert_close(swapped @ rest.T, z @ rest.T)  # nothing outside it moves
    torch.testing.assert_close(swapped - swapped.mean(0), z - z.mean(0))  # variation across positions kept
    own = z.mean(0) + rest.T @ torch.randn(d - 3, generator=gen, dtype=torch.float64)  # same subspace mean
    assert swap_shift(z, modes, own).abs().max().item() < 1e-12  # identical groups: no shift, KL 0


def test_kl_is_zero_for_identical_distributions_and_matches_a_hand_value():
    log_p = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert kl_per_position(log_p, log_p).abs().max().item() == 0.0
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert kl_per_position(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)


def test_partners_are_other_groups_seeded_and_distinct_while_possible():
    groups = ["a", "b", "c", "a", "d"]
    drawn = draw_partners(groups, 3, seed=5)
    assert drawn == draw_partners(groups, 3, seed=5) and drawn != draw_partners(groups, 3, seed=6)
    for own, partners in zip(groups, drawn):
        assert own not in partners and len(set(partners)) == 3
    assert all(p == ["b", "b"] for p in draw_partners(["a", "b"], 2, 0)[:1])
    with pytest.raises(ValueError, match="2 groups"):
        draw_partners(["a", "a"], 1, 0)
