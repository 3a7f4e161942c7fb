"""MS swap math on planted ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcollapse.analysis.swap import draw_partners, kl_per_position, swap_shift


def test_swap_moves_only_the_subspace_mean_to_the_group_mean():
    d, T = 10, 6
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    modes, rest = q.T[:3], q.T[3:]
    z = torch.randn(T, d, generator=gen, dtype=torch.float64)
    mu_b = torch.randn(d, generator=gen, dtype=torch.float64)
    swapped = z + swap_shift(z, modes, mu_b)
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


def test_swap_measures_on_a_decoder_that_reads_only_the_ta_subspace():
    """msswap's per-sample measures on planted groups and a toy decoder whose answer logits are
    W_j mean_t(z) with the rows of every W_j in the TA subspace: swapping in the MS subspace changes
    nothing (KL 0, loss change 0); swapping in the TA subspace gives the closed form
    KL(softmax(W_j zbar) || softmax(W_j (zbar + s))) and sum_j log p_j(y_j) - log q_j(y_j), s = P (mu_B - zbar)."""
    from scipy.special import log_softmax

    from mcollapse.experiments.msswap import swap_measures

    d, vocab, answers = 8, 5, [1, 3, 0]
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    ms, ta = q.T[:2], q.T[2:5]
    weights = [rng.normal(size=(vocab, 3)) @ ta for _ in answers]  # logits read the TA subspace only
    groups = ["a", "b", "c", "a", "b"]
    group_mean = {g: rng.normal(size=d) for g in sorted(set(groups))}
    arrays = [rng.normal(size=(T, d)).astype(np.float32) + group_mean[g].astype(np.float32)
              for T, g in zip((4, 6, 3, 5, 2), groups)]
    partners = draw_partners(groups, 2, seed=3)

    def scored(variants, r):
        rows = [log_softmax(np.stack([w @ z.double().mean(0).numpy() for w in weights]), axis=-1) for z in variants]
        row_of = np.repeat(np.arange(len(variants)), len(answers))
        return torch.as_tensor(np.concatenate(rows)), torch.as_tensor(row_of), torch.tensor(answers * len(variants))

    modes = {"MS": torch.as_tensor(ms, dtype=torch.float32), "TA": torch.as_tensor(ta, dtype=torch.float32)}
    means = {g: torch.as_tensor(m, dtype=torch.float32) for g, m in group_mean.items()}
    rows = [4, 1, 0]
    out = swap_measures(arrays, rows, partners, modes, means, scored, "sum")
    assert out["kl_MS"].shape == (3, 2) and np.abs(out["kl_MS"]).max() < 1e-6
    assert np.abs(out["dce_MS"]).max() < 1e-5
    for n, r in enumerate(rows):
        zbar = arrays[r].astype(np.float64).mean(0)
        base = log_softmax(np.stack([w @ zbar for w in weights]), axis=-1)
        assert out["loss_base"][n] == pytest.approx(-sum(base[j, y] for j, y in enumerate(answers)), rel=1e-5)
        for draw, partner in enumerate(partners[r]):
            for name, basis in (("MS", ms), ("TA", ta)):
                shift = basis.T @ basis @ (group_mean[partner] - zbar)
                assert out[f"shift_{name}"][n, draw] == pytest.approx(np.linalg.norm(shift), rel=1e-4)
            swapped = log_softmax(np.stack([w @ (zbar + shift) for w in weights]), axis=-1)
            kl = (np.exp(base) * (base - swapped)).sum(-1).mean()
            dce = sum(base[j, y] - swapped[j, y] for j, y in enumerate(answers))
            assert kl > 1e-3 and out["kl_TA"][n, draw] == pytest.approx(kl, rel=1e-3)
            assert out["dce_TA"][n, draw] == pytest.approx(dce, rel=1e-3, abs=1e-5)
    mean_loss = swap_measures(arrays, rows, partners, modes, means, scored, "mean")
    np.testing.assert_allclose(mean_loss["loss_base"], out["loss_base"] / len(answers), rtol=1e-6)
