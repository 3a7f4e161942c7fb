"""Statistics helpers agree with scipy and say nan rather than warn where a quantity is undefined."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

import mcollapse.analysis.stats as mstats
from mcollapse.analysis.stats import bootstrap_ci, paired_t, spearman


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_paired_t_matches_scipy(seed: int, confidence: float):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=37)
    b = a + rng.normal(0.2, 0.5, size=37)
    result = paired_t(a, b, confidence=confidence)
    reference = stats.ttest_rel(a, b)
    interval = reference.confidence_interval(confidence_level=confidence)
    assert result["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-10)
    assert result["ci_low"] == pytest.approx(interval.low, rel=1e-12)
    assert result["ci_high"] == pytest.approx(interval.high, rel=1e-12)
    assert (result["n"], result["df"]) == (37, 36)
    assert result["mean"] == pytest.approx(np.mean(a - b))
    assert result["std"] == pytest.approx(np.std(a - b, ddof=1))

    one_sample = paired_t(a - b, confidence=confidence)
    reference = stats.ttest_1samp(a - b, 0.0)
    assert one_sample["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert one_sample["p"] == pytest.approx(reference.pvalue, rel=1e-10)


def test_paired_t_without_spread_is_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = paired_t(np.full(5, 2.0), np.full(5, 1.5))
        same = paired_t(np.ones(4), np.ones(4))
    assert shifted["t"] == math.inf and shifted["p"] == 0.0
    assert shifted["ci_low"] == shifted["ci_high"] == 0.5
    assert math.isnan(same["t"]) and math.isnan(same["p"])


def test_paired_t_rejects_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_t([1.0, np.nan, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_t([1.0])


def test_bootstrap_is_reproducible_and_matches_scipy():
    values = np.random.default_rng(6).exponential(size=200)
    first = bootstrap_ci(values, seed=7, n_resamples=4000)
    assert first == bootstrap_ci(values, seed=7, n_resamples=4000)
    assert first["estimate"] == pytest.approx(values.mean())
    assert first["ci_low"] < values.mean() < first["ci_high"]
    reference = stats.bootstrap(
        (values,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(8)
    ).confidence_interval
    width = reference.high - reference.low
    assert first["ci_low"] == pytest.approx(reference.low, abs=0.05 * width)
    assert first["ci_high"] == pytest.approx(reference.high, abs=0.05 * width)
    # For a mean of 200 values the percentile interval is close to the t interval.
    t_interval = paired_t(values)
    assert first["ci_low"] == pytest.approx(t_interval["ci_low"], abs=0.1 * width)


def test_bootstrap_blocks_do_not_change_the_result(monkeypatch):
    values = np.random.default_rng(9).normal(size=50)
    whole = bootstrap_ci(values, np.median, n_resamples=300, seed=1)
    monkeypatch.setattr(mstats, "_BOOTSTRAP_CHUNK_ELEMENTS", 7 * 50)
    assert bootstrap_ci(values, np.median, n_resamples=300, seed=1) == whole
    assert whole["estimate"] == pytest.approx(np.median(values))


def test_spearman_matches_scipy_and_is_nan_when_undefined():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=30), rng.normal(size=30)
    result = spearman(x, y)
    reference = stats.spearmanr(x, y)
    assert (result["r"], result["p"], result["n"]) == (
        pytest.approx(reference.statistic), pytest.approx(reference.pvalue), 30
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman(np.ones(5), x[:5])["r"])
        assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0])["p"])
        assert spearman([1.0, 2.0, 3.0], [2.0, 4.0, 9.0])["r"] == pytest.approx(1.0)
