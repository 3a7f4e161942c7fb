"""Planted truths for the ablation's edits, references and controls: toy decoders whose loss reads
known things of their input, run through the same plan, edits and summaries as the experiment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcollapse.analysis import subspaces as sub
from mcollapse.analysis.ablation import fit_constants, loss_table, prepare
from mcollapse.analysis.ablation_summary import summaries
from mcollapse.analysis.dose_response import class_effects
from mcollapse.analysis.interventions import aligned, edit, partners
from mcollapse.analysis.stats import cluster_bootstrap_mean

D, T, N = 8, 5, 48
S = [0, 1]  # the planted subspace: the first two coordinates


def _basis(arrays):
    """An eigenbasis over the coordinate axes, sorted by pooled variance (as analysis.modes orders it)."""
    pooled = np.stack([a.mean(axis=0) for a in arrays]).astype(np.float64)
    lam = pooled.var(axis=0, ddof=1)
    order = np.argsort(-lam, kind="stable")
    return np.eye(D)[order], lam[order], pooled.mean(axis=0), float(lam.sum()), order


def _run(arrays, score, ms_axes, *, variants=("resample", "centred"), dose_variants=(), n_dose=0,
         n_matched=0, speakers=None, optimal_steps=0, seed=0):
    vectors, lam, mean, total, order = _basis(arrays)
    is_ms = np.isin(order, ms_axes)
    conds, plan, context = prepare(arrays, vectors, lam, mean, total, is_ms, seed=seed, n_random=4, ms_k=[],
                                   variants=list(variants), n_draws=3, control_variants=["resample", "centred"],
                                   n_matched=n_matched, dose_variants=list(dose_variants), n_dose=n_dose)
    if "optimal" in variants:
        fitted = fit_constants(plan, context, score, steps=optimal_steps, batch=16, lr=0.05, seed=seed)
        context.constants.update({k: v["constant"] for k, v in fitted.items()})
    table = loss_table(context, range(len(arrays)), plan.columns,
                       lambda zs, rows: score(zs, rows).detach().numpy(), per_forward=64)
    clusters = [speakers] if speakers is not None else None
    out = summaries(table, plan, clusters, n_resamples=400, seed=seed)
    return {(r["condition"], r["variant"]): r for r in out["results"]}, out


def _speakers():
    return np.repeat(np.arange(N // 4), 4)


def _pattern_decoder(seed: int):
    """Inputs whose component along S is a fixed position pattern p_t plus small noise, and a decoder
    whose loss is the distance of that component from p_t: it wants the pattern, no sample's values."""
    rng = np.random.default_rng(seed)
    pattern = rng.normal(0, 3.0, size=(T, 2))
    arrays = []
    for _ in range(N):
        z = rng.normal(0, 1.0, size=(T, D))
        z[:, S] = pattern + rng.normal(0, 0.1, size=(T, 2))
        arrays.append(z.astype(np.float32))
    target = torch.as_tensor(pattern, dtype=torch.float32)

    def score(zs, rows):
        return torch.stack([-((z[:, S] - target) ** 2).sum() for z in zs])

    return arrays, score


def test_a_position_pattern_is_not_information():
    """(a) The decoder wants a fixed, sample-independent pattern p_t along S and reads nothing
    sample-specific: centred ablation of S destroys the pattern (a large loss), while resampling S
    and swapping the whole input cost about nothing."""
    arrays, score = _pattern_decoder(seed=0)
    rows, out = _run(arrays, score, S, variants=("resample", "position_mean", "centred", "uncentred"))
    centred, resample = rows[("ms_all", "centred")], rows[("ms_all", "resample")]
    assert centred["delta_loss"] > 50 * max(abs(resample["delta_loss"]), 1e-3)
    assert centred["delta_loss"] > 20
    assert abs(out["delta_swap"]) < 0.1 and abs(resample["delta_loss"]) < 0.1
    assert abs(rows[("ms_all", "position_mean")]["delta_loss"]) < 0.2  # the pattern kept (only the noise goes)
    assert rows[("floor", "floor")]["delta_loss"] > 20


def test_b_sample_specific_information_along_s_is_all_the_swap():
    """(b) The decoder's loss reads a per-sample code along S only: resampling S costs what swapping
    the whole input costs; resampling the complement costs nothing."""
    rng = np.random.default_rng(1)
    codes = rng.normal(0, 2.0, size=(N, 2))
    arrays = []
    for i in range(N):
        z = rng.normal(0, 1.5, size=(T, D))
        z[:, S] = codes[i] + rng.normal(0, 0.05, size=(T, 2))
        arrays.append(z.astype(np.float32))
    wanted = torch.as_tensor(codes, dtype=torch.float32)

    def score(zs, rows):
        return torch.stack([-((z[:, S].mean(0) - wanted[r]) ** 2).sum() for z, r in zip(zs, rows)])

    rows, out = _run(arrays, score, S, speakers=_speakers())
    resample = rows[("ms_all", "resample")]
    assert out["delta_swap"] > 3
    assert resample["frac_of_swap"] == pytest.approx(1.0, abs=0.1)
    assert resample["delta_cluster_ci_low"] > 0
    complement = [a for a in range(D) if a not in S]
    rows_c, out_c = _run(arrays, score, complement, speakers=_speakers())
    assert abs(rows_c[("ms_all", "resample")]["frac_of_swap"]) < 0.02  # the complement carries none of it
    assert rows_c[("ms_all", "resample")]["delta_cluster_ci_low"] <= 0 <= \
        rows_c[("ms_all", "resample")]["delta_cluster_ci_high"] + 1e-9


def _variance_decoder(extra_along_s: float):
    def score(zs, rows):
        out = []
        for z in zs:
            centred = z - z.new_tensor(MEAN)
            out.append((centred ** 2).sum() + extra_along_s * (centred[:, S] ** 2).sum())
        return torch.stack(out)  # log q grows with the variance present: removing any costs
    return score


MEAN = np.zeros(D)


def test_c_a_decoder_that_only_counts_variance_puts_ms_and_ta_on_the_random_curve():
    """(c) The loss depends only on how much variance is removed, not where: MS and TA lie on the
    dose-response curve of random mode subsets and their class effects' intervals cover 0. The same
    data with a decoder that also reads S puts MS above the curve."""
    rng = np.random.default_rng(2)
    scales = np.array([4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.7, 0.5])
    arrays = [(rng.normal(0, 1.0, size=(T, D)) * scales + rng.normal(0, 1.0, size=D) * scales).astype(np.float32)
              for _ in range(N)]
    MEAN[:] = np.concatenate(arrays).mean(axis=0)
    ms_axes = [0, 3, 6]
    rows, out = _run(arrays, _variance_decoder(0.0), ms_axes, variants=("centred",), dose_variants=("centred",),
                     n_dose=24, speakers=_speakers())
    assert out["dose_curves"]["centred"]["n_points"] == 24
    for group in ("ms_all", "ta_top"):
        row = rows[(group, "centred")]
        assert row["delta_loss"] > 0  # removing variance lowers log q, so the loss rises
        assert row["class_effect_ci_low"] <= 0 <= row["class_effect_ci_high"], row
    reads_s, _ = _run(arrays, _variance_decoder(5.0), [0, 1, 5], variants=("centred",), dose_variants=("centred",),
                      n_dose=24, speakers=_speakers())
    ms = reads_s[("ms_all", "centred")]
    assert ms["class_effect_ci_high"] < 0 or ms["class_effect_ci_low"] > 0  # MS is off the curve


def test_optimal_ablation_is_no_worse_than_centred_and_fitted_on_other_samples():
    arrays, score = _pattern_decoder(seed=3)
    rows, _ = _run(arrays, score, S, variants=("optimal", "centred", "resample"), optimal_steps=300)
    optimal, centred = rows[("ms_all", "optimal")], rows[("ms_all", "centred")]
    assert optimal["n"] == N - N // 2  # reported on the half that did not fit it
    assert optimal["delta_loss"] < 0.05 * centred["delta_loss"]  # the per-position constant is the pattern


def test_alignment_partners_and_edits():
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert np.array_equal(aligned(z, 6), z)
    assert np.array_equal(aligned(z, 3), z[[0, 2, 5]])  # round(t * 5 / 2): 0, 2.5 -> 2 (to even), 5
    assert aligned(z, 11).shape == (11, 2) and np.array_equal(aligned(z, 11)[[0, -1]], z[[0, -1]])
    draws = partners(10, 4, seed=1, avoid=np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    assert draws.shape == (4, 10) and not np.any(draws == np.arange(10))
    assert not np.any(draws // 2 == np.arange(10) // 2)  # never a sample with the same answer
    u = torch.eye(3)[:1]
    x, other = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[7.0, 8.0, 9.0]])
    assert torch.equal(edit(x, u, "resample", partner=other), torch.tensor([[7.0, 2.0, 3.0]]))
    assert torch.equal(edit(x, u, "uncentred"), torch.tensor([[0.0, 2.0, 3.0]]))
    assert torch.equal(edit(x, u, "centred", mean=torch.tensor([5.0, 5.0, 5.0])), torch.tensor([[5.0, 2.0, 3.0]]))


def test_dose_matched_controls_match_the_dose_and_report_their_overlap():
    lam = np.array([50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    cov, total = np.diag(lam), lam.sum()
    for k, target in ((3, 0.5), (2, 0.05), (5, 0.9)):
        drawn = sub.dose_matched_subspaces(k, target, cov, total, 8, seed=4)
        assert drawn.accepted == 8
        assert all(abs(s - target) <= 0.02 * target for s in drawn.shares)
        for v in drawn.subspaces:
            np.testing.assert_allclose(v @ v.T, np.eye(k), atol=1e-9)
    haar = sub.dose_matched_subspaces(5, 0.5, np.eye(10), 10, 4, seed=1)
    assert haar.beta == 0.0 and haar.accepted == 4  # isotropic variance: every 5-of-10 subspace holds half
    assert sub.overlap(sub.mode_subset([0, 1], 10), sub.mode_subset([0, 1, 2], 10)) == pytest.approx(1.0)
    assert sub.overlap(sub.mode_subset([0, 1], 10), sub.mode_subset([2, 3], 10)) == 0.0


def test_cluster_intervals_are_wider_than_iid_ones_when_clusters_share_an_effect():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(8), 25)
    values = rng.normal(0, 1, 8)[groups] + rng.normal(0, 0.1, groups.size)
    clustered = cluster_bootstrap_mean(values, [groups], n_resamples=1000)
    iid = cluster_bootstrap_mean(values, None, n_resamples=1000)
    assert clustered["ci_high"] - clustered["ci_low"] > 4 * (iid["ci_high"] - iid["ci_low"])
    assert clustered["n_clusters"] == [8]
    crossed = cluster_bootstrap_mean(values, [groups, np.tile(np.arange(25), 8)], n_resamples=1000)
    assert crossed["n_clusters"] == [8, 25] and crossed["ci_high"] > crossed["ci_low"]


def test_class_effect_recovers_a_planted_offset():
    rng = np.random.default_rng(6)
    doses = np.linspace(0.05, 0.95, 20)
    points = (2 * doses + doses ** 2)[None, :] + rng.normal(0, 0.05, (60, 20))
    classes = np.stack([2 * 0.5 + 0.25 + 1.0 + rng.normal(0, 0.05, 60), 2 * 0.3 + 0.09 + rng.normal(0, 0.05, 60)], 1)
    out = class_effects(points, doses, classes, [0.5, 0.3], None, n_resamples=500)
    first, second = out["effects"]
    assert first["ci_low"] < 1.0 < first["ci_high"] and first["ci_low"] > 0.8
    assert second["ci_low"] <= 0 <= second["ci_high"]
    assert not first["extrapolated"]
