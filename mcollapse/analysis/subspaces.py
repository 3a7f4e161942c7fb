"""Subspaces of the kept modes, their dose, and dose-matched random controls.

Everything here works in mode coordinates: a k-dimensional subspace of the span of the K kept
modes is a (k, K) matrix V with orthonormal rows, its directions in model space V @ B (B the (K, d)
basis). A mode subset is V = rows of the identity.

The *dose* of a subspace is the share of variance it removes: of the pooled vectors (the space the
basis was fitted in) or of the individual token vectors (what the decoder sees). With C the
covariance in mode coordinates and `total` the trace of the full covariance, share(V) = tr(V C V^T) /
total.

A random control must be random with respect to the MS/TA labels and matched in dose. Uniform
(Haar) subspaces of the span reach doses near k/K only, so a condition holding 99.9 % or 0.1 % of
the variance would have no control. The draws here come from a one-parameter family that contains
Haar: V = orth(G S^beta) with G Gaussian and S = diag(C)^(1/2), beta = 0 being Haar; beta is set by
bisection so that the draws centre on the condition's dose, and a draw is kept when its dose lies
within `tolerance` (relative) of it. The family depends on the variances alone, never on the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mode_subset(indices, n_modes: int) -> np.ndarray:
    """V for a set of modes: the matching rows of the identity."""
    out = np.zeros((len(indices), n_modes))
    out[np.arange(len(indices)), list(indices)] = 1.0
    return out


def share(v: np.ndarray, covariance: np.ndarray, total: float) -> float:
    """Variance removed by the subspace V (k, K), as a share of `total`."""
    if v.size == 0:
        return 0.0
    return float(np.einsum("ik,kl,il->", v, covariance, v) / total)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared cosine between two subspaces, ||A B^T||_F^2 / min(k_a, k_b): 1 when one contains
    the other, k_b / K on average for an unrelated uniform draw. A control that overlaps its
    treatment by most of this is no control."""
    if a.size == 0 or b.size == 0:
        return 0.0
    return float(np.sum((a @ b.T) ** 2) / min(a.shape[0], b.shape[0]))


def _draw(rng: np.random.Generator, k: int, log_scales: np.ndarray, beta: float) -> np.ndarray:
    tilt = beta * log_scales
    g = rng.standard_normal((log_scales.size, k)) * np.exp(tilt - tilt.max())[:, None]
    q, _ = np.linalg.qr(g)
    return q[:, :k].T


@dataclass
class MatchedDraws:
    subspaces: list[np.ndarray]  # accepted (k, K) draws
    shares: list[float]
    beta: float  # 0: Haar
    tried: int
    target: float
    tolerance: float

    @property
    def accepted(self) -> int:
        return len(self.subspaces)


def dose_matched_subspaces(k: int, target: float, covariance: np.ndarray, total: float, n: int, *, seed: int = 0,
                           tolerance: float = 0.02, max_tries: int = 2000, probe: int = 24) -> MatchedDraws:
    """Up to n random k-dimensional subspaces of the span whose dose lies within `tolerance` (relative)
    of `target`; see the module docstring for the family they are drawn from. Fewer than n come back
    when the dose cannot be reached in `max_tries` draws (the caller reports how many)."""
    size = covariance.shape[0]
    if not 0 < k <= size:
        raise ValueError(f"a subspace of dimension {k} does not fit in {size} modes")
    scales = 0.5 * np.log(np.clip(np.diag(covariance), 1e-300, None))
    rng = np.random.default_rng(seed)

    def mean_share(beta: float) -> float:
        probe_rng = np.random.default_rng([seed, 7])
        return float(np.mean([share(_draw(probe_rng, k, scales, beta), covariance, total) for _ in range(probe)]))

    beta = 0.0
    at_zero = mean_share(0.0)
    if abs(at_zero - target) > tolerance * target / 2:
        low, high = (0.0, 64.0) if target > at_zero else (-64.0, 0.0)
        for _ in range(16):  # the mean dose rises with beta
            beta = (low + high) / 2
            if mean_share(beta) < target:
                low = beta
            else:
                high = beta
        beta = (low + high) / 2
    kept, shares, tried = [], [], 0
    while len(kept) < n and tried < max_tries:
        tried += 1
        v = _draw(rng, k, scales, beta)
        s = share(v, covariance, total)
        if abs(s - target) <= tolerance * target:
            kept.append(v)
            shares.append(s)
    return MatchedDraws(kept, shares, float(beta), tried, float(target), tolerance)


def random_subsets(n_modes: int, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """n random mode subsets, sizes uniform in 1..K-1 and members uniform, for the dose-response
    curve: they cover the doses from a single small mode to nearly all of the variance."""
    rng = np.random.default_rng([seed, 11])
    out = []
    for _ in range(n):
        size = int(rng.integers(1, max(2, n_modes)))
        out.append(tuple(sorted(int(i) for i in rng.choice(n_modes, size=min(size, n_modes), replace=False))))
    return out


def token_covariance(arrays: list[np.ndarray], vectors: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Covariance of the individual token vectors in mode coordinates (K, K), the trace of their full
    covariance, and their mean (d,): the dose the decoder sees, position by position."""
    tokens = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays])
    mean = tokens.mean(axis=0)
    centred = tokens - mean
    coords = centred @ np.asarray(vectors, dtype=np.float64).T
    n = max(len(tokens) - 1, 1)
    return coords.T @ coords / n, float(np.sum(centred ** 2) / n), mean
