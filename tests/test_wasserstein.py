"""W1: closed-form Gaussian cases, exact OT checked against 1-D truth, honest intervals and null."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import chi, norm, wasserstein_distance

from mcollapse.analysis import wasserstein as ws
from mcollapse.analysis.wasserstein import (
    OTConvergenceError,
    exact_w1,
    fit_pca_basis,
    sliced_w1,
    w1_between,
)


def stratified_normal(n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of N(0, 1), one per probability stratum: each is N(0, 1), the set has no scale noise."""
    return rng.permutation(norm.ppf((np.arange(n) + rng.random(n)) / n))[:, None]


def stratified_normal_2d(n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of N(0, I_2) with stratified radii (chi, 2 dof) and independent uniform angles."""
    radius = chi.ppf((np.arange(n) + rng.random(n)) / n, df=2)
    angle = rng.uniform(0, 2 * np.pi, n)
    return rng.permutation(np.c_[radius * np.cos(angle), radius * np.sin(angle)])


# --- closed forms -------------------------------------------------------------------------------

def test_shift_2d_matches_closed_form():
    """N(0, I) vs N(mu, I): W1 = |mu| exactly (a translation). i.i.d. draws, n = 1000."""
    rng = np.random.default_rng(7)
    mu = np.array([3.0, 4.0])  # |mu| = 5
    a = rng.normal(size=(1000, 2))
    b = rng.normal(size=(1000, 2)) + mu
    result = w1_between(a, b, dims=None, n_bootstrap=0, null_split=False)
    assert result.w1 == pytest.approx(5.0, rel=0.05)


def test_shift_through_pca_matches_closed_form():
    """The PCA path: a shift in 32-D seen through a 2-D basis of the union keeps W1 = |mu|."""
    rng = np.random.default_rng(11)
    d = 32
    mu = rng.normal(size=d)
    mu *= 5.0 / np.linalg.norm(mu)
    a = rng.normal(size=(1000, d))
    b = rng.normal(size=(1000, d)) + mu
    result = w1_between(a, b, dims=2, n_bootstrap=0, null_split=False)
    assert result.dims == 2
    assert result.w1 == pytest.approx(5.0, rel=0.05)


def test_scale_1d_matches_closed_form():
    """N(0, 1) vs N(0, s^2): W1 = |s - 1| E|Z| = |s - 1| sqrt(2 / pi).

    Stratified draws: with i.i.d. draws the sample scales alone move W1 by ~3 % (one sd) at this n,
    so a 5 % check would test the draw rather than the estimator.
    """
    rng = np.random.default_rng(3)
    s = 2.0
    a = stratified_normal(600, rng)
    b = s * stratified_normal(600, rng)
    result = w1_between(a, b, dims=None, n_bootstrap=0, null_split=False)
    assert result.w1 == pytest.approx(abs(s - 1) * math.sqrt(2 / math.pi), rel=0.05)


def test_scale_2d_matches_closed_form():
    """N(0, I) vs N(0, s^2 I) in d dims: W1 = |s - 1| E|Z|, E|Z| = sqrt(2) G((d+1)/2) / G(d/2).

    The dilation x -> s x attains it, and the 1-Lipschitz f(x) = |x| proves it is optimal.
    """
    rng = np.random.default_rng(5)
    s = 2.0
    a = stratified_normal_2d(600, rng)
    b = s * stratified_normal_2d(600, rng)
    expected = abs(s - 1) * math.sqrt(2) * math.gamma(1.5) / math.gamma(1.0)
    result = w1_between(a, b, dims=None, n_bootstrap=0, null_split=False)
    assert result.w1 == pytest.approx(expected, rel=0.05)


# --- exact OT ------------------------------------------------------------------------------------

def test_exact_w1_equals_1d_truth_with_weights_and_unequal_sizes():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=37), rng.exponential(size=52)
    wx, wy = rng.random(37), rng.random(52)
    expected = wasserstein_distance(x, y, wx, wy)
    assert exact_w1(x, y, wx, wy) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert exact_w1(x, y) == pytest.approx(wasserstein_distance(x, y), rel=1e-9)


def test_integer_masses_equal_duplicated_points():
    """The bootstrap's counts-as-masses are the same measure as the duplicated points."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(25, 3)) + 0.5
    counts = rng.integers(1, 4, size=20)
    assert exact_w1(x, y, weights_x=counts) == pytest.approx(exact_w1(np.repeat(x, counts, axis=0), y), rel=1e-9)


def test_non_convergence_is_an_error_not_a_warning():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(60, 3)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked POT warning would fail here instead of raising ours
        with pytest.raises(OTConvergenceError, match="did not converge"):
            exact_w1(x, y, max_iter=1)
    assert issubclass(OTConvergenceError, RuntimeError)
    with pytest.raises(OTConvergenceError):
        w1_between(x, y, dims=None, n_bootstrap=0, max_iter=1)


def test_sliced_never_exceeds_exact():
    rng = np.random.default_rng(4)
    for shift in (0.0, 0.7, 3.0):
        x = rng.normal(size=(80, 6))
        y = rng.normal(size=(90, 6)) * 1.3 + shift
        assert sliced_w1(x, y, n_projections=64, seed=1) <= exact_w1(x, y) + 1e-9


# --- PCA basis -----------------------------------------------------------------------------------

def test_pca_is_capped_by_rank_and_full_rank_pca_changes_nothing():
    """At full dimension the basis is a rotation, so W1 equals the ambient value exactly."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.4
    result = w1_between(a, b, dims=256, n_bootstrap=0, null_split=False)
    assert (result.dims, result.dims_requested) == (5, 256)
    assert result.explained_variance == pytest.approx(1.0)
    assert result.w1 == pytest.approx(exact_w1(a, b), rel=1e-9)
    _, components, ratios = fit_pca_basis(a[:3], b[:2], dims=256)  # 5 points: rank <= 4
    assert components.shape == (4, 5) and ratios.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n_each, d", [(40, 6), (6, 50)])  # d <= n and n < d take different routes
def test_pca_basis_matches_svd(n_each, d):
    rng = np.random.default_rng(14)
    a, b = rng.normal(size=(n_each, d)) * np.linspace(3, 0.5, d), rng.normal(size=(n_each, d)) + 1
    mean, components, ratios = fit_pca_basis(a, b, dims=4)
    centred = np.concatenate([a, b]) - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(ratios, singular[:4] ** 2 / (singular**2).sum(), rtol=1e-9)
    np.testing.assert_allclose(components @ components.T, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(components.T @ components, vt[:4].T @ vt[:4], atol=1e-8)  # same subspace


def test_rank_deficient_data_keep_only_their_span():
    rng = np.random.default_rng(15)
    span = np.linalg.qr(rng.normal(size=(10, 3)))[0].T  # 3 orthonormal directions in 10-D
    a, b = rng.normal(size=(30, 3)) @ span, (rng.normal(size=(20, 3)) + 1) @ span
    result = w1_between(a, b, dims=256, n_bootstrap=0, null_split=False)
    assert result.dims == 3
    assert result.w1 == pytest.approx(exact_w1(a, b), rel=1e-9)


def test_projection_lowers_w1_and_reports_kept_variance():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(60, 10)), rng.normal(size=(60, 10)) + 0.5
    low = w1_between(a, b, dims=3, n_bootstrap=0, null_split=False)
    assert low.w1 <= exact_w1(a, b) + 1e-9
    assert 0 < low.explained_variance < 1


def test_basis_is_fitted_once_across_bootstrap(monkeypatch):
    calls = []
    original = ws.fit_pca_basis

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ws, "fit_pca_basis", counting)
    rng = np.random.default_rng(9)
    w1_between(rng.normal(size=(30, 6)), rng.normal(size=(30, 6)), dims=3, n_bootstrap=5)
    assert len(calls) == 1


# --- bootstrap, null, bookkeeping ----------------------------------------------------------------

def test_shifted_clouds_exceed_the_null_and_intervals_hold_their_estimates():
    rng = np.random.default_rng(10)
    b = rng.normal(size=(200, 16))
    a = rng.normal(size=(200, 16))
    a[:, 0] += 2.0
    result = w1_between(a, b, dims=8, n_bootstrap=50, seed=3)
    for estimate, (low, high) in [
        (result.w1, result.ci),
        (result.null_w1, result.null_ci),
        (result.excess_w1, result.excess_ci),
    ]:
        assert low <= estimate <= high
    assert result.null_sizes == (100, 100)
    assert result.matched_w1 > result.null_ci[1]
    assert result.excess_ci[0] > 0
    assert result.sliced_w1 > result.sliced_null_w1
    assert result.bootstrap_shift > 0  # duplicates inflate W1: why the interval is re-centred


def test_identical_distributions_give_an_excess_interval_around_zero():
    """Calibration: over independent data sets, the 95 % excess interval covers 0 most times."""
    covered = 0
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        a, b = rng.normal(size=(120, 8)), rng.normal(size=(120, 8))
        result = w1_between(a, b, dims=None, n_bootstrap=40, seed=seed)
        covered += result.excess_ci[0] <= 0 <= result.excess_ci[1]
        assert abs(result.excess_w1) < 0.2 * result.null_w1  # the null is the bulk of the value
    assert covered >= 9


def test_subsampling_counts_seeding_and_flat_metrics():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(90, 4)), rng.normal(size=(70, 4))
    first = w1_between(a, b, dims=3, n_bootstrap=4, seed=5, max_points=50)
    again = w1_between(a, b, dims=3, n_bootstrap=4, seed=5, max_points=50)
    more = w1_between(a, b, dims=3, n_bootstrap=8, seed=5, max_points=50)
    assert (first.n_a, first.n_b, first.n_a_input, first.n_b_input) == (50, 50, 90, 70)
    assert first == again
    assert (more.w1, more.null_w1, more.matched_w1) == (first.w1, first.null_w1, first.matched_w1)
    metrics = first.metrics()
    assert metrics["w1_ci_low"] == first.ci[0] and metrics["n_null_2"] == 25
    bare = w1_between(a, b, dims=3, n_bootstrap=0, null_split=False)
    assert bare.ci is None and bare.null_w1 is None and bare.metrics()["excess_w1_ci_high"] is None


def test_bad_inputs_fail_clearly():
    rng = np.random.default_rng(13)
    with pytest.raises(ValueError, match="feature dimension"):
        w1_between(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        w1_between(np.full((10, 3), np.nan), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="null needs"):
        w1_between(rng.normal(size=(10, 3)), rng.normal(size=(3, 3)), n_bootstrap=0)
    with pytest.raises(ValueError, match="masses"):
        exact_w1(rng.normal(size=5), rng.normal(size=5), weights_x=-np.ones(5))


def test_zero_bootstrap_reports_without_intervals(tmp_path, capsys):
    """n_bootstrap=0 means no bootstrap: the figure and the table say so instead of failing."""
    from mcollapse.experiments.wasserstein import _figure, _print_table

    rng = np.random.default_rng(14)
    a, b = rng.normal(size=(30, 5)) + 1.0, rng.normal(size=(30, 5))
    result = w1_between(a, b, dims=4, n_bootstrap=0)
    _figure(a, b, result, "llm_layer_16", tmp_path / "clouds.png", "toy")
    assert (tmp_path / "clouds.png").is_file()
    _print_table(result, "toy")
    shown = capsys.readouterr().out
    assert "no bootstrap" in shown and f"{result.w1:.3f}" in shown
    assert all(value is None for name, value in result.metrics().items() if "_ci_" in name)
