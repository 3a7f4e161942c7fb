"""Small statistics shared by the experiments: paired t-tests, bootstrap intervals, Spearman.

Effects in this project (ablation, swap, LoRA) are measured on the same samples under two
conditions, so the test is a one-sample t-test on the per-sample differences, reported with its
95 % confidence interval from the t distribution rather than a bare t or p. Inputs are checked for
non-finite values instead of silently dropping them: which samples were skipped is the caller's
bookkeeping and must show up in its counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats as _sp

_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22  # resampled values held in memory at once


def _finite_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values; drop those samples (and count them) first")
    return array


def paired_t(a, b=None, *, confidence: float = 0.95) -> dict:
    """One-sample t-test of the paired differences ``a - b`` (or of ``a`` itself when b is None).

    Returns mean, std (ddof=1), se, n, df, t, two-sided p and the ``confidence`` interval of the
    mean difference from the t distribution. Identical to ``scipy.stats.ttest_rel(a, b)``; with
    zero spread the result is exact instead of a warning: t = +-inf and p = 0 for a non-zero mean,
    t = p = nan for a zero mean.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    deltas = _finite_1d(a, "a")
    if b is not None:
        other = _finite_1d(b, "b")
        if other.shape != deltas.shape:
            raise ValueError(f"paired samples need equal lengths, got {deltas.size} and {other.size}")
        deltas = deltas - other
    n = deltas.size
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean = float(deltas.mean())
    std = float(deltas.std(ddof=1))
    se = std / math.sqrt(n)
    df = n - 1
    if se > 0:
        t = mean / se
        p = float(2.0 * _sp.t.sf(abs(t), df))
        half = float(_sp.t.ppf(0.5 + confidence / 2.0, df)) * se
    else:
        t = math.copysign(math.inf, mean) if mean != 0 else math.nan
        p = 0.0 if mean != 0 else math.nan
        half = 0.0
    return {
        "mean": mean,
        "std": std,
        "se": se,
        "n": n,
        "df": df,
        "t": float(t),
        "p": p,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "confidence": confidence,
    }


def bootstrap_ci(
    values,
    stat: Callable[..., np.ndarray] = np.mean,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap interval of ``stat`` over i.i.d. ``values``; the same seed gives the same result.

    ``stat`` is called as ``stat(samples, axis=-1)`` on a block of resamples (numpy reductions such
    as np.mean and np.median work as they are). Resamples are drawn in fixed-size blocks so memory
    stays bounded for large samples. Returns estimate (stat of the data), ci_low, ci_high, n,
    n_resamples, confidence.
    """
    data = _finite_1d(values, "values")
    n = data.size
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 values, got {n}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    replicates = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        replicates[start:stop] = np.asarray(stat(data[indices], axis=-1), dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return {
        "estimate": float(stat(data, axis=-1)),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": n,
        "n_resamples": n_resamples,
        "confidence": confidence,
    }


def spearman(x, y) -> dict:
    """Spearman rank correlation with its two-sided p-value (scipy), nan when undefined.

    Undefined means fewer than 3 pairs or a constant input; scipy would warn there, and a warning
    in a long run is easy to miss while a nan in the results table is not.
    """
    first = _finite_1d(x, "x")
    second = _finite_1d(y, "y")
    if first.shape != second.shape:
        raise ValueError(f"spearman needs equal lengths, got {first.size} and {second.size}")
    n = first.size
    if n < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return {"r": math.nan, "p": math.nan, "n": n}
    result = _sp.spearmanr(first, second)
    return {"r": float(result.statistic), "p": float(result.pvalue), "n": n}


def cluster_weights(clusters: list, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap weights (n_resamples, n) that resample whole clusters.

    `clusters` is a list of per-sample label sequences, one per grouping (speaker, sentence, ...).
    Each grouping's clusters are drawn with replacement, independently, and a sample's weight is the
    product of how often its cluster was drawn in each grouping (Owen's pigeonhole bootstrap for
    crossed random effects, 2007): with one grouping it is the ordinary cluster bootstrap, with none
    (an empty list) the i.i.d. bootstrap of samples."""
    if not clusters:
        raise ValueError("cluster_weights needs at least one grouping; pass the sample index for i.i.d.")
    labels = [np.unique(np.asarray(c, dtype=object).astype(str), return_inverse=True)[1] for c in clusters]
    n = labels[0].size
    if any(lab.size != n for lab in labels):
        raise ValueError("every grouping must label every sample")
    rng = np.random.default_rng(seed)
    weights = np.ones((n_resamples, n))
    for lab in labels:
        k = int(lab.max()) + 1
        counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_resamples)  # (B, k): draws of each cluster
        weights *= counts[:, lab]
    return weights


def cluster_bootstrap_mean(values, clusters: list | None, *, n_resamples: int = 2000, confidence: float = 0.95,
                           seed: int = 0) -> dict:
    """Mean of `values` (n,) or of each column of (n, c) with a percentile interval from resampling
    whole clusters (see cluster_weights); `clusters` None or empty: samples are their own clusters.

    Returns estimate, ci_low, ci_high (arrays for 2-D input), n, n_clusters (per grouping),
    n_resamples, confidence. Replicates in which every sample got weight 0 are redrawn."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim not in (1, 2) or not np.all(np.isfinite(data)):
        raise ValueError("values must be a finite 1-D or 2-D array")
    n = data.shape[0]
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 samples, got {n}")
    groupings = list(clusters) if clusters else [np.arange(n)]
    weights = cluster_weights(groupings, n_resamples, seed)
    empty = weights.sum(axis=1) == 0
    if empty.any():
        extra = cluster_weights(groupings, n_resamples * 4, seed + 1)
        extra = extra[extra.sum(axis=1) > 0][: int(empty.sum())]
        weights[np.flatnonzero(empty)[: len(extra)]] = extra
        weights = weights[weights.sum(axis=1) > 0]
    flat = data.reshape(n, -1)
    replicates = (weights @ flat) / weights.sum(axis=1, keepdims=True)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha], axis=0)
    estimate = flat.mean(axis=0)
    shape = data.shape[1:]
    pick = (lambda a: float(a[0])) if data.ndim == 1 else (lambda a: a.reshape(shape))
    return {"estimate": pick(estimate), "ci_low": pick(low), "ci_high": pick(high), "n": n,
            "n_clusters": [len(set(map(str, g))) for g in groupings], "n_resamples": len(weights),
            "confidence": confidence, "replicates": replicates if data.ndim == 2 else replicates[:, 0]}
