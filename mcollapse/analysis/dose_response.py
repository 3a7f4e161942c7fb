"""Loss change against the variance an edit removes, and what a class of modes adds beyond it.

Random mode subsets of many sizes trace the curve Delta = f(dose), f(v) = a v + b v^2 through the
origin (no edit, no change). A class of modes (MS, TA, ...) then has an effect beyond its dose,
Delta_class - f(dose_class): zero when the decoder cares only about how much variance goes, not
which. Intervals come from one cluster bootstrap shared by every column (the curve is refitted on
each replicate), so the curve's own uncertainty is in the class effect's interval.
"""

from __future__ import annotations

import numpy as np

from mcollapse.analysis.stats import cluster_weights


def _design(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.stack([x, x ** 2], axis=-1)


def fit_curve(doses, deltas) -> np.ndarray:
    """(a, b) of Delta = a v + b v^2 by least squares; with fewer than 3 points, a line (b = 0)."""
    x, y = np.asarray(doses, dtype=np.float64), np.asarray(deltas, dtype=np.float64)
    if x.size < 3:
        a = float(x @ y / (x @ x)) if x @ x > 0 else 0.0
        return np.array([a, 0.0])
    coef, *_ = np.linalg.lstsq(_design(x), y, rcond=None)
    return coef


def curve(coef, doses) -> np.ndarray:
    return _design(doses) @ np.asarray(coef)


def class_effects(point_deltas: np.ndarray, point_doses, class_deltas: np.ndarray, class_doses, clusters, *,
                  n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """point_deltas (n, m): per-sample loss changes of the m random subsets at `point_doses`;
    class_deltas (n, c) those of the c classes at `class_doses`. Returns the curve's coefficients and,
    per class, effect = mean Delta - f(dose) with its cluster-bootstrap interval, and whether its dose
    lies outside the random points' range (an extrapolation)."""
    point_deltas = np.asarray(point_deltas, dtype=np.float64)
    class_deltas = np.asarray(class_deltas, dtype=np.float64)
    px, cx = np.asarray(point_doses, dtype=np.float64), np.asarray(class_doses, dtype=np.float64)
    n = point_deltas.shape[0]
    coef = fit_curve(px, point_deltas.mean(axis=0))
    effect = class_deltas.mean(axis=0) - curve(coef, cx)
    weights = cluster_weights(list(clusters) if clusters else [np.arange(n)], n_resamples, seed)
    weights = weights[weights.sum(axis=1) > 0]
    norm = weights.sum(axis=1, keepdims=True)
    point_reps = weights @ point_deltas / norm
    class_reps = weights @ class_deltas / norm
    design = _design(px) if px.size >= 3 else None
    if design is not None:
        coefs = np.linalg.lstsq(design, point_reps.T, rcond=None)[0].T  # (B, 2)
    else:
        denom = px @ px if px @ px > 0 else np.inf
        coefs = np.stack([point_reps @ px / denom, np.zeros(len(point_reps))], axis=1)
    effect_reps = class_reps - coefs @ _design(cx).T
    alpha = (1 - confidence) / 2
    low, high = np.quantile(effect_reps, [alpha, 1 - alpha], axis=0)
    lo_dose, hi_dose = (float(px.min()), float(px.max())) if px.size else (np.nan, np.nan)
    return {"coef": coef.tolist(), "n_points": int(px.size), "n_resamples": int(len(weights)),
            "effects": [{"effect": float(e), "ci_low": float(a), "ci_high": float(b), "dose": float(d),
                         "extrapolated": bool(d < lo_dose or d > hi_dose)}
                        for e, a, b, d in zip(effect, low, high, cx)]}
