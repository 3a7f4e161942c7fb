"""Ablation math on planted ground truth: a toy decoder whose loss reads a known subspace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mcollapse.analysis.ablation import conditions, empty_controls, project_out, summarise, variance_share


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


def test_conditions_pick_ms_matched_ta_random_and_the_k_sweep():
    lam = np.array([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    is_ms = np.array([True, False, True, False, False, True, False, False])
    conds = conditions(is_ms, lam, n_random=4, seed=10, ms_k=[1, 2, 5])
    by_name = {c.label: c for c in conds}
    assert by_name["ms_all"].modes == (0, 2, 5)
    assert by_name["ta_matched"].modes == (1, 3, 4)  # the three TA modes of largest variance
    randoms = [c for c in conds if c.name == "random"]
    assert [c.seed for c in randoms] == [10, 11, 12, 13] and all(len(c.modes) == 3 for c in randoms)
    assert len({c.modes for c in randoms}) > 1 and all(len(set(c.modes)) == 3 for c in randoms)
    assert by_name["ms_top1"].modes == (0,) and by_name["ms_top2"].modes == (0, 2) and "ms_top5" not in by_name
    assert conditions(is_ms, lam, n_random=4, seed=10) == [c for c in conds if c.name != "ms_k"]  # seeded
    assert conditions(np.zeros(8, dtype=bool), lam) == []
    assert variance_share(lam, (0, 2, 5)) == pytest.approx(16.0 / lam.sum())


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
    draws = [c for c in conditions(is_ms, lam, n_random=5, seed=7) if c.name == "random"]
    assert [c.seed for c in draws] == [7, 8, 9, 10, 11]
    for draw in draws:
        alone = [c for c in conditions(is_ms, lam, n_random=1, seed=draw.seed) if c.name == "random"]
        assert alone[0].modes == draw.modes  # draw r alone, from its label seed + r
        expected = np.random.default_rng(draw.seed).choice(lam.size, size=6, replace=False)
        assert draw.modes == tuple(sorted(int(i) for i in expected))


def test_empty_controls_are_named():
    lam = np.array([5.0, 4.0, 3.0, 2.0])
    assert empty_controls(np.array([True, False, True, False]), n_random=2) == []
    assert empty_controls(np.ones(4, dtype=bool), n_random=2) == ["ta_matched"]  # every mode MS: no TA control
    assert empty_controls(np.zeros(4, dtype=bool), n_random=2) == ["ms_all", "ta_matched", "random"]
    assert empty_controls(np.ones(4, dtype=bool), n_random=0) == ["ta_matched"]  # no draws asked: not empty
    built = {c.name for c in conditions(np.ones(4, dtype=bool), lam, n_random=2)}
    assert "ta_matched" not in built and {"ms_all", "random"} <= built


def test_experiment_wiring_gives_the_hand_computed_loss_changes():
    """The ablation experiment's loss table and summaries on a toy decoder whose loss reads modes
    {0, 1, 4} of the basis: -score(z) = sum_t sum_{k read} <u_k, z_t>^2. Ablating a set S then
    changes a sample's loss by -sum_t sum_{k in S read} <u_k, z_t>^2 (uncentred) or by
    sum_t sum_{k in S read} (<u_k, m>^2 - <u_k, z_t>^2) (centred: the mean's component stays)."""
    from mcollapse.experiments.ablation import condition_columns, condition_losses, condition_summaries

    d, n_modes, read = 10, 8, [0, 1, 4]
    rng = np.random.default_rng(4)
    vectors = _orthonormal(d, seed=5).numpy()[:n_modes]
    mean = rng.normal(size=d)
    lam = np.linspace(8.0, 1.0, n_modes)
    is_ms = np.array([True, False, False, True, True, False, False, False])  # MS {0, 3, 4}; TA by variance {1, 2, 5}
    arrays = [(rng.normal(size=(T, d)) + mean).astype(np.float32) for T in (3, 5, 2, 4, 6)]
    conds = conditions(is_ms, lam, n_random=3, seed=11)
    columns = condition_columns(["centred", "uncentred"], conds)
    calls = []

    def score(zs, sample_rows):  # the toy decoder: log q = -(energy in the read modes)
        calls.append(len(zs))
        return [-float(((z.double() @ torch.as_tensor(vectors[read].T)) ** 2).sum()) for z in zs]

    rows = [3, 0, 4, 1, 2]
    table = condition_losses(arrays, rows, columns, torch.as_tensor(vectors, dtype=torch.float32),
                             torch.as_tensor(mean, dtype=torch.float32), score, per_forward=7)
    assert max(calls) <= 7 and sum(calls) == len(rows) * len(columns)

    def change(sample, modes, variant):
        z = arrays[sample].astype(np.float64)
        hit = [k for k in modes if k in read]
        along = z @ vectors[hit].T
        if variant == "uncentred":
            return -float((along**2).sum())
        return float(((mean @ vectors[hit].T) ** 2).sum() * len(z) - (along**2).sum())

    baseline = np.array([float(((arrays[r].astype(np.float64) @ vectors[read].T) ** 2).sum()) for r in rows])
    np.testing.assert_allclose(table[:, 0], baseline, rtol=1e-5)
    draws = [tuple(sorted(np.random.default_rng(11 + r).choice(n_modes, size=3, replace=False))) for r in range(3)]
    expected_modes = {"ms_all": [(0, 3, 4)], "ta_matched": [(1, 2, 5)], "random": draws}
    results = condition_summaries(table, columns, conds, ["centred", "uncentred"], lam)
    assert {(r["variant"], r["condition"]) for r in results} == {
        (v, c) for v in ("centred", "uncentred") for c in expected_modes}
    for result in results:
        members = expected_modes[result["condition"]]
        per_draw = np.array([[change(r, modes, result["variant"]) for r in rows] for modes in members])
        assert result["delta_loss"] == pytest.approx(per_draw.mean(), rel=1e-5, abs=1e-6)
        assert result["mean_loss"] == pytest.approx((baseline + per_draw.mean(axis=0)).mean(), rel=1e-5)
        if result["condition"] == "random":  # pooled: per-sample mean over the draws, plus the draws' spread
            pct = 100 * per_draw.mean(axis=1) / baseline.mean()
            assert result["n_draws"] == 3
            assert result["draw_delta_pct_std"] == pytest.approx(np.std(pct, ddof=1), rel=1e-4)
            assert result["draw_delta_pct_min"] == pytest.approx(pct.min(), rel=1e-4, abs=1e-6)
    ta = next(r for r in results if r["condition"] == "ta_matched" and r["variant"] == "uncentred")
    assert ta["delta_loss"] == pytest.approx(np.mean([change(r, (1,), "uncentred") for r in rows]), rel=1e-5)
