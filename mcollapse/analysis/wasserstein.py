"""Wasserstein-1 distance between modal and text representation clouds, with its finite-sample floor.

The paper's bound multiplies the decoder's Lipschitz constant by W1(P_M, P_T), so we estimate W1 with
the Euclidean ground cost, exactly (network simplex, POT's `emd2`), between the two empirical
measures. How it is estimated and why:

* **One PCA basis.** Both clouds are projected onto the top `dims` principal directions of their
  union, fitted once. Projection is 1-Lipschitz, so the projected W1 is a lower bound of the
  ambient one; `explained_variance` says how much of the union's variance the basis keeps. With
  `dims` at least the data's rank the projection is an isometry on the data and nothing is lost.
* **Exact OT or an error.** A network simplex that stops at its iteration limit returns a cost
  that is not the optimum. That is raised as `OTConvergenceError`, never passed on as a warning.
* **Null from the text cloud.** In high dimension the empirical W1 between two samples of the
  *same* distribution is far from zero (the bias shrinks like n^(-1/d)). The text cloud is split
  at random into two parts and W1 between them is the floor. Because the floor depends on the
  sample sizes, the modal cloud is also compared at the same sizes: `matched_w1` is W1 between
  a random subset of the modal cloud as large as the first text part and the second text part,
  the same second part the null uses. `excess_w1 = matched_w1 - null_w1` then has expectation
  zero when the two distributions are equal and is the like-for-like distance above the floor.
* **Bootstrap with the basis fixed.** Each replicate resamples points with replacement inside
  every cloud (and every null part) and recomputes the exact W1 in the same PCA coordinates.
  A point drawn k times is one support point of mass k/n, the same measure as k duplicates,
  with a smaller transport problem. Duplicates make a resampled cloud lumpier, which inflates
  W1 (by far more than its spread when the clouds overlap or the dimension is high), so the
  plain percentile interval often lies entirely above the estimate. The interval reported is
  the percentile interval of the replicates re-centred on the point estimate: it measures the
  sampling spread of the estimator at this n, and the inflation is reported as
  `bootstrap_shift`. Neither interval covers the finite-sample bias; that is what the null is for.
* **Sliced W1** (mean over random unit directions of the 1-D W1) is a cheap companion computed in
  the same coordinates. It never exceeds the exact W1 and, for a pure shift v in d dimensions,
  is about ||v|| * sqrt(2 / (pi d)), so compare it only between pairs at the same `dims`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import ot
import scipy.linalg
from scipy.spatial.distance import cdist

from mcollapse.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITER = 10_000_000  # network-simplex iterations; a limit, not a cost, when OT converges
_OPTIMAL = 1                   # POT's result_code for a proven optimum
_RANK_TOLERANCE = 1e-10        # PCA directions below this fraction of the top variance are dropped


class OTConvergenceError(RuntimeError):
    """The exact OT solver stopped before proving optimality, so its cost is not W1."""


@dataclass
class W1Result:
    """One W1 comparison between a modal cloud (a) and a text cloud (b), in a fixed PCA basis.

    Intervals are (low, high) at `confidence`, or None when `n_bootstrap` is 0; null fields are
    None when the null was not requested. `n_a`, `n_b` count the points used (after
    `max_points` subsampling), `n_a_input`, `n_b_input` the points given. `null_sizes` are the
    sizes of the two text parts; `matched_w1` uses a modal subset of the first part's size.
    `bootstrap_shift` is the mean replicate minus the point estimate (the duplicates' inflation).
    """

    w1: float
    ci: tuple[float, float] | None
    sliced_w1: float
    n_a: int
    n_b: int
    n_a_input: int
    n_b_input: int
    dims: int
    dims_requested: int | None
    explained_variance: float
    null_w1: float | None
    null_ci: tuple[float, float] | None
    sliced_null_w1: float | None
    matched_w1: float | None
    excess_w1: float | None
    excess_ci: tuple[float, float] | None
    null_sizes: tuple[int, int] | None
    bootstrap_shift: float | None
    n_bootstrap: int
    confidence: float
    n_projections: int
    seed: int

    def metrics(self) -> dict[str, float]:
        """Flat metric -> value pairs for long-format result rows (None where not computed)."""
        flat: dict[str, float] = {}
        for key, value in asdict(self).items():
            if key in ("ci", "null_ci", "excess_ci"):
                prefix = {"ci": "w1", "null_ci": "null_w1", "excess_ci": "excess_w1"}[key]
                flat[f"{prefix}_ci_low"] = None if value is None else value[0]
                flat[f"{prefix}_ci_high"] = None if value is None else value[1]
            elif key == "null_sizes":
                flat["n_null_1"] = None if value is None else value[0]
                flat["n_null_2"] = None if value is None else value[1]
            else:
                flat[key] = value
        return flat


def fit_pca_basis(a: np.ndarray, b: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal directions of the union of two clouds: (mean, components (k, d), variance ratios).

    One basis for both clouds keeps them in the same coordinates; the union is stacked as is, so a
    much larger cloud weighs more (subsample to equal sizes for an even-handed basis). `k` is
    `dims` capped at the union's numerical rank: directions with less than 1e-10 of the top
    variance carry no extent of the data, so dropping them leaves distances unchanged. Only the
    top eigenpairs of the smaller of the two Gram matrices are computed, which is several times
    faster than a full SVD at the sizes used here (thousands of points in thousands of dims).
    """
    a, b = _as_cloud(a, "a"), _as_cloud(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"clouds differ in feature dimension: {a.shape[1]} vs {b.shape[1]}")
    if dims < 1:
        raise ValueError(f"dims must be at least 1, got {dims}")
    union = np.concatenate([a, b])
    mean = union.mean(axis=0)
    centred = union - mean
    n, d = centred.shape
    total = float(np.einsum("ij,ij->", centred, centred))
    k = min(dims, max(1, n - 1), d)
    if d <= n:
        values, vectors = scipy.linalg.eigh(centred.T @ centred, subset_by_index=[d - k, d - 1])
        values, components = values[::-1], vectors[:, ::-1].T
    else:
        values, left = scipy.linalg.eigh(centred @ centred.T, subset_by_index=[n - k, n - 1])
        values, left = values[::-1], left[:, ::-1]
        positive = values > 0
        values, left = values[positive], left[:, positive]
        components = (centred.T @ left / np.sqrt(values)).T  # right singular vectors from left ones
    kept = values > _RANK_TOLERANCE * values[0] if len(values) and values[0] > 0 else np.zeros(0, bool)
    if not kept.any():  # every point is the same point: any single direction represents the data
        return mean, np.eye(1, d), np.zeros(1)
    return mean, np.ascontiguousarray(components[kept]), values[kept] / total


def exact_w1(
    x: np.ndarray,
    y: np.ndarray,
    weights_x: np.ndarray | None = None,
    weights_y: np.ndarray | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
) -> float:
    """Exact W1 with Euclidean cost between two weighted point clouds (uniform weights by default).

    Clouds may differ in size; weights are normalised to mass one each. Raises OTConvergenceError
    when the network simplex does not prove optimality within `max_iter` iterations.
    """
    x, y = _as_cloud(x, "x"), _as_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"clouds differ in feature dimension: {x.shape[1]} vs {y.shape[1]}")
    wx, wy = _weights(weights_x, len(x), "weights_x"), _weights(weights_y, len(y), "weights_y")
    cost = cdist(x, y)  # direct differences: no cancellation, unlike the |x|^2 + |y|^2 - 2xy route
    with warnings.catch_warnings():
        # POT warns and returns a non-optimal cost; we turn that into an error below instead.
        warnings.simplefilter("ignore", UserWarning)
        value, log = ot.emd2(wx, wy, cost, numItermax=int(max_iter), log=True)
    if log["result_code"] != _OPTIMAL:
        raise OTConvergenceError(
            f"exact OT did not converge on a {len(x)} x {len(y)} problem "
            f"(max_iter={max_iter}): {log.get('warning') or 'result code ' + str(log['result_code'])}"
        )
    return float(value)


def sliced_w1(
    x: np.ndarray,
    y: np.ndarray,
    n_projections: int = 256,
    seed: int = 0,
    weights_x: np.ndarray | None = None,
    weights_y: np.ndarray | None = None,
) -> float:
    """Mean over `n_projections` random unit directions of the exact 1-D W1 of the projections.

    Uses POT's `sliced_wasserstein_distance` with p=1 (directions uniform on the sphere). Each 1-D
    projection is 1-Lipschitz, so the result is at most the exact W1 of the same clouds.
    """
    x, y = _as_cloud(x, "x"), _as_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"clouds differ in feature dimension: {x.shape[1]} vs {y.shape[1]}")
    wx, wy = _weights(weights_x, len(x), "weights_x"), _weights(weights_y, len(y), "weights_y")
    return float(ot.sliced_wasserstein_distance(x, y, wx, wy, n_projections=n_projections, p=1, seed=seed))


def w1_between(
    a: np.ndarray,
    b: np.ndarray,
    dims: int | None = 256,
    n_bootstrap: int = 200,
    seed: int = 0,
    null_split: bool = True,
    max_points: int | None = None,
    confidence: float = 0.95,
    n_projections: int = 256,
    max_iter: int = DEFAULT_MAX_ITER,
) -> W1Result:
    """W1 between modal cloud `a` and text cloud `b` (rows are samples), with CI, null and sliced W1.

    `dims=None` skips PCA and works in the ambient space. `max_points` caps each cloud by a seeded
    draw without replacement. The null splits `b`, so it needs at least four text points and two
    modal points. All randomness comes from `seed`, in independent streams, so changing
    `n_bootstrap` leaves the subsample, basis, split and point estimates unchanged.
    """
    a, b = _as_cloud(a, "a"), _as_cloud(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"clouds differ in feature dimension: {a.shape[1]} vs {b.shape[1]}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    n_a_input, n_b_input = len(a), len(b)
    subsample_rng, split_rng, boot_rng, sliced_seq = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    a, b = _subsample(a, max_points, subsample_rng), _subsample(b, max_points, subsample_rng)

    if dims is None:
        explained = 1.0
    else:
        mean, components, ratios = fit_pca_basis(a, b, dims)
        a, b = (a - mean) @ components.T, (b - mean) @ components.T
        explained = float(ratios.sum())
    sliced_seed = int(sliced_seq.integers(2**31))

    w1 = exact_w1(a, b, max_iter=max_iter)
    sliced = sliced_w1(a, b, n_projections=n_projections, seed=sliced_seed)

    if null_split:
        m = min(len(a), len(b) // 2)
        if m < 2 or len(b) - m < 2:
            raise ValueError(
                f"the null needs at least 4 text points and 2 modal points, got {len(b)} and {len(a)}"
            )
        order = split_rng.permutation(len(b))
        b1, b2 = b[order[:m]], b[order[m:]]
        a_m = a[split_rng.choice(len(a), size=m, replace=False)]
        null_w1 = exact_w1(b1, b2, max_iter=max_iter)
        matched_w1 = exact_w1(a_m, b2, max_iter=max_iter)

    # Columns: W1(a, b), null W1(b1, b2), matched W1(a_m, b2) sharing the null's resampled b2.
    replicates = np.empty((n_bootstrap, 3))
    with progress_bar("W1 bootstrap", n_bootstrap) as advance:
        for i in range(n_bootstrap):
            (xa, wa), (xb, wb) = _resample(a, boot_rng), _resample(b, boot_rng)
            replicates[i, 0] = exact_w1(xa, xb, wa, wb, max_iter=max_iter)
            if null_split:
                (x1, w1_), (x2, w2_), (xm, wm) = (_resample(c, boot_rng) for c in (b1, b2, a_m))
                replicates[i, 1] = exact_w1(x1, x2, w1_, w2_, max_iter=max_iter)
                replicates[i, 2] = exact_w1(xm, x2, wm, w2_, max_iter=max_iter)
            advance()

    boot = n_bootstrap > 0
    result = W1Result(
        w1=w1,
        ci=_recentred_interval(replicates[:, 0], w1, confidence) if boot else None,
        sliced_w1=sliced,
        n_a=len(a),
        n_b=len(b),
        n_a_input=n_a_input,
        n_b_input=n_b_input,
        dims=a.shape[1],
        dims_requested=dims,
        explained_variance=explained,
        null_w1=None,
        null_ci=None,
        sliced_null_w1=None,
        matched_w1=None,
        excess_w1=None,
        excess_ci=None,
        null_sizes=None,
        bootstrap_shift=float(replicates[:, 0].mean() - w1) if boot else None,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        n_projections=n_projections,
        seed=seed,
    )
    if null_split:
        excess = matched_w1 - null_w1
        result.null_w1 = null_w1
        result.matched_w1 = matched_w1
        result.excess_w1 = excess
        # The same directions as the main sliced value, so the two are comparable.
        result.sliced_null_w1 = sliced_w1(b1, b2, n_projections=n_projections, seed=sliced_seed)
        result.null_sizes = (len(b1), len(b2))
        if boot:
            result.null_ci = _recentred_interval(replicates[:, 1], null_w1, confidence)
            result.excess_ci = _recentred_interval(replicates[:, 2] - replicates[:, 1], excess, confidence)
    if dims is not None and result.dims < dims:
        logger.info("W1: PCA dimension capped at %d (requested %d) by the data's rank", result.dims, dims)
    return result


def _as_cloud(x: np.ndarray, name: str) -> np.ndarray:
    """A finite float64 (n, d) array; a 1-D input is n points on the line."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def _weights(w: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """Non-negative masses normalised to one (uniform when None)."""
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{name} must be {n} non-negative finite masses with a positive sum")
    return w / w.sum()


def _subsample(x: np.ndarray, max_points: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_points is None or len(x) <= max_points:
        return x
    return x[np.sort(rng.choice(len(x), size=max_points, replace=False))]


def _resample(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap draw of n points with replacement, as distinct points with masses count / n."""
    counts = np.bincount(rng.integers(0, len(x), size=len(x)), minlength=len(x))
    drawn = counts > 0
    return x[drawn], counts[drawn] / len(x)


def _recentred_interval(replicates: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
    """Percentile interval of the replicates, shifted so that their mean sits on the estimate."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    shift = estimate - replicates.mean()
    return float(low + shift), float(high + shift)


__all__ = [
    "DEFAULT_MAX_ITER",
    "OTConvergenceError",
    "W1Result",
    "exact_w1",
    "fit_pca_basis",
    "sliced_w1",
    "w1_between",
]
