"""Ablation math on planted ground truth: a toy decoder whose loss reads a known subspace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mcollapse.analysis.ablation import (
    conditions,
    empty_controls,
    loss_table,
    prepare,
    project_out,
    summarise,
    variance_share,
)
from mcollapse.analysis.interventions import aligned


def _orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # rows orthonormal


def test_loss_changes_only_through_the_subspace_it_reads():
    d, T = 12, 7
    basis = _orthonormal(d)
    read = basis[:3]  # the toy decoder's loss depends on z only through these directions

    def loss(z):
        return ((z @ read.T) ** 2).sum(dim=(-1, -2))

    z = torch.randn(20, T, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean = z.reshape(-1, d).mean(0)
    unread = project_out(z, basis[3:8], None)
    torch.testing.assert_close(loss(unread), loss(z))  # orthogonal directions: no change at all
    gone = project_out(z, read, None)
    torch.testing.assert_close(loss(gone), torch.zeros(20, dtype=torch.float64))
    centred = project_out(z, read, mean)
    # centred ablation keeps the mean's component: every position becomes its projection of the mean
    torch.testing.assert_close(centred @ read.T, (mean @ read.T).expand(20, T, 3))
    partial = project_out(z, basis[[0, 5]], None)
    expected = loss(z) - ((z @ basis[0]) ** 2).sum(-1)
    torch.testing.assert_close(loss(partial), expected)
    assert torch.equal(project_out(z, basis[:0], mean), z)


def test_conditions_pick_ms_count_matched_ta_random_and_the_k_sweep():
    lam = np.array([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    is_ms = np.array([True, False, True, False, False, True, False, False])
    conds = conditions(is_ms, lam, n_random=4, seed=10, ms_k=[1, 2, 5])
    by_name = {c.label: c for c in conds}
    assert by_name["ms_all"].modes == (0, 2, 5)
    assert "ms_top" not in by_name  # k = min(3 MS, 5 TA) = 3: the top-3 MS modes are all of them
    assert by_name["ta_top"].modes == (1, 3, 4)  # the three TA modes of largest variance
    randoms = [c for c in conds if c.name == "random_k"]
    assert [c.seed for c in randoms] == [10, 11, 12, 13] and all(len(c.modes) == 3 for c in randoms)
    assert len({c.modes for c in randoms}) > 1 and all(len(set(c.modes)) == 3 for c in randoms)
    assert by_name["ms_top1"].modes == (0,) and by_name["ms_top2"].modes == (0, 2) and "ms_top5" not in by_name
    assert conditions(is_ms, lam, n_random=4, seed=10) == [c for c in conds if c.name != "ms_k"]  # seeded
    assert conditions(np.zeros(8, dtype=bool), lam) == []
    assert variance_share(lam, (0, 2, 5)) == pytest.approx(16.0 / lam.sum())
    many_ms = conditions(~is_ms, lam, n_random=1, seed=0)  # 5 MS, 3 TA: k = 3 both ways
    by_many = {c.label: c for c in many_ms}
    assert by_many["ms_top"].modes == (1, 3, 4) and by_many["ta_top"].modes == (0, 2, 5)
    assert len(by_many["random_k_seed0"].modes) == 3


def test_summary_is_scipys_paired_t_test():
    rng = np.random.default_rng(3)
    base = rng.normal(5.0, 1.0, 40)
    ablated = base + rng.normal(0.2, 0.3, 40)
    out = summarise(base, ablated)
    reference = stats.ttest_rel(ablated, base)
    assert out["t"] == pytest.approx(reference.statistic) and out["p"] == pytest.approx(reference.pvalue)
    assert out["delta_pct"] == pytest.approx(100 * (ablated - base).mean() / base.mean())
    assert out["delta_ci_low"] < out["delta_loss"] < out["delta_ci_high"] and out["n"] == 40


def test_each_random_draw_is_reproducible_from_its_seed_label():
    lam = np.linspace(10.0, 1.0, 12)
    is_ms = np.array([True, False] * 6)
    draws = [c for c in conditions(is_ms, lam, n_random=5, seed=7) if c.name == "random_k"]
    assert [c.seed for c in draws] == [7, 8, 9, 10, 11]
    for draw in draws:
        alone = [c for c in conditions(is_ms, lam, n_random=1, seed=draw.seed) if c.name == "random_k"]
        assert alone[0].modes == draw.modes  # draw r alone, from its label seed + r
        expected = np.random.default_rng(draw.seed).choice(lam.size, size=6, replace=False)
        assert draw.modes == tuple(sorted(int(i) for i in expected))


def test_empty_controls_are_named():
    lam = np.array([5.0, 4.0, 3.0, 2.0])
    assert empty_controls(np.array([True, False, True, False]), n_random=2) == []
    assert empty_controls(np.ones(4, dtype=bool), n_random=2) == ["ta_top", "random_k"]  # every mode MS: k = 0
    assert empty_controls(np.zeros(4, dtype=bool), n_random=2) == ["ms_all", "ta_top", "random_k"]
    assert empty_controls(np.ones(4, dtype=bool), n_random=0) == ["ta_top"]  # no draws asked: not empty
    built = {c.name for c in conditions(np.ones(4, dtype=bool), lam, n_random=2)}
    assert built == {"ms_all"}


def test_loss_table_scores_every_column_in_chunks_with_the_hand_computed_edits():
    """The loss table on a toy decoder whose loss reads modes {0, 1, 4}: -score(z) = sum_t sum_{k read}
    <u_k, z_t>^2. Centred ablation of a set S changes a sample's loss by
    sum_t sum_{k in S read} (<u_k, m>^2 - <u_k, z_t>^2), uncentred by -sum_t sum_{k in S read} <u_k, z_t>^2,
    and chunks never exceed per_forward."""
    d, n_modes, read = 10, 8, [0, 1, 4]
    rng = np.random.default_rng(4)
    vectors = _orthonormal(d, seed=5).numpy()[:n_modes]
    mean = rng.normal(size=d)
    lam = np.linspace(8.0, 1.0, n_modes)
    is_ms = np.array([True, False, False, True, True, False, False, False])  # MS {0, 3, 4}; TA by variance {1, 2, 5}
    arrays = [(rng.normal(size=(T, d)) + mean).astype(np.float32) for T in (3, 5, 2, 4, 6)]
    conds, plan, context = prepare(arrays, vectors, lam, mean, float(lam.sum()), is_ms, seed=11, n_random=2,
                                   ms_k=[], variants=["centred", "uncentred", "resample"], n_draws=2,
                                   control_variants=[], n_matched=0, dose_variants=[], n_dose=0)
    calls = []

    def score(zs, sample_rows):
        calls.append(len(zs))
        return [-float(((z.double() @ torch.as_tensor(vectors[read].T)) ** 2).sum()) for z in zs]

    rows = [3, 0, 4, 1, 2]
    table = loss_table(context, rows, plan.columns, score, per_forward=7)
    assert max(calls) <= 7 and sum(calls) == len(rows) * len(plan.columns)
    index = {c.label: i for i, c in enumerate(plan.columns)}

    def energy(z, modes):
        hit = [k for k in modes if k in read]
        return float(((z.astype(np.float64) @ vectors[hit].T) ** 2).sum())

    for n, r in enumerate(rows):
        z = arrays[r].astype(np.float64)
        assert table[n, 0] == pytest.approx(energy(z, read), rel=1e-5)
        for cond in conds:
            hit = [k for k in cond.modes if k in read]
            uncentred = energy(z, read) - energy(z, hit)
            centred = uncentred + len(z) * float(((mean @ vectors[hit].T) ** 2).sum())
            assert table[n, index[f"uncentred/{cond.label}"]] == pytest.approx(uncentred, rel=1e-4, abs=1e-4)
            assert table[n, index[f"centred/{cond.label}"]] == pytest.approx(centred, rel=1e-4, abs=1e-4)
    partner = context.partners[0, 3]
    other = aligned(arrays[partner], len(arrays[3])).astype(np.float64)
    ms = (0, 3, 4)
    expected = energy(arrays[3], read) - energy(arrays[3], [0, 4]) + energy(other, [0, 4])
    assert table[0, index["resample/ms_all/draw0"]] == pytest.approx(expected, rel=1e-4)
    assert context.partners.shape == (2, 5) and not np.any(context.partners == np.arange(5))
    assert ms == conds[0].modes
