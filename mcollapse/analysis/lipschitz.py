"""Decoder sensitivity and representation size: the L_log and D of Theorem 2 (paper §A.2-A.3).

L_log (Assumption 2) is a Lipschitz constant of the log-score l(c, z, y) = log q(y | z, c) in z,
the representation the LLM consumes (the adapter-output sequence). For a differentiable score the
smallest such constant over a convex region is the supremum of ||grad_z l|| there, so we measure
the distribution of per-sample gradient norms (Frobenius over all positions and features) and
report its mean, median, p95 and max; which statistic stands in for the supremum is the caller's
choice (the paper's §B.2 names p95, its Table 8 products use the mean). ``secant_lipschitz`` gives
a derivative-free cross-check: every secant slope |l(z_i) - l(z_j)| / ||z_i - z_j|| between
sequences of equal length is a certified lower bound on the constant along that segment.

D (Assumption 3) is the diameter of the region the representations occupy; we estimate it as the
largest pairwise distance in a sample. §A.3 allows D to be replaced by the diameter of any set
that contains the support of both the modal and the text conditionals, so the exact diameter of
the pooled modal+text sample is the directly measurable D_S. The paper's D_eff is said to come
"from the participation ratio of the pooled representation covariance" without a formula; the one
used here (``effective_diameter``) is: PR = (sum lambda)^2 / sum lambda^2 over the covariance
eigenvalues, and D_eff = 2 * sqrt(variance captured by the top-PR principal directions), i.e. the
diameter of the ball, centred at the mean, whose radius is the RMS distance from the mean inside
the PR-dimensional principal subspace. For points spread over a k-dimensional sphere (what
LayerNorm produces) PR = k and D_eff equals the sphere's diameter exactly.

For Theorem 2 to hold as stated, L_log, D and W1 must be measured with the same norm in the same
space (the flattened z the gradient is taken with respect to).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_QUANTILES = {"p5": 5.0, "p25": 25.0, "median": 50.0, "p75": 75.0, "p95": 95.0, "p99": 99.0}


# --------------------------------------------------------------------------------------------
# Per-sample gradient norms
# --------------------------------------------------------------------------------------------


def per_sample_gradient_norms(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    return_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """||grad_z l_i||_F for every sample of a batch, from one backward pass.

    ``score_fn`` maps z of shape (B, ...) to the per-sample log-scores l_i = log q(y_i | z_i, c_i),
    shape (B,). Because sample i's score depends only on z_i, the gradient of sum_i l_i with
    respect to z holds every per-sample gradient in its own slice, so one backward replaces B.
    That separation only holds if nothing in ``score_fn`` mixes samples (padding must be masked
    out of attention, no batch statistics); batched and one-by-one results then agree.

    The score defines the scale: the gradient of a sum of token log-probs (the log-score of the
    whole target, as in Eq. 3) is larger than that of their mean by the number of target tokens.

    ``mask`` (shape z.shape[:-1], true where a position is real) excludes padded positions from
    the norm. Norms are accumulated in float32 at least. Returns norms of shape (B,) on z's
    device, plus the gradient itself (z's shape, float32 or wider) when ``return_grad`` is set.
    """
    if z.dim() < 2:
        raise ValueError(f"z needs a leading batch dimension, got shape {tuple(z.shape)}")
    leaf = z.detach()
    if leaf.is_inference():  # tensors made under inference_mode cannot join a graph; copy them
        leaf = leaf.clone()
    leaf.requires_grad_(True)
    with torch.enable_grad():
        scores = score_fn(leaf)
    batch = z.shape[0]
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"score_fn must return one score per sample, shape ({batch},), got {shape}")
    if scores.requires_grad:
        (grad,) = torch.autograd.grad(scores.sum(), leaf, allow_unused=True)
    else:
        grad = None
    wide = torch.promote_types(z.dtype, torch.float32)
    grad = torch.zeros_like(leaf, dtype=wide) if grad is None else grad.detach().to(wide)
    if mask is not None:
        if tuple(mask.shape) != tuple(z.shape[:-1]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match z.shape[:-1] {tuple(z.shape[:-1])}")
        grad = grad * mask.to(device=grad.device, dtype=grad.dtype).unsqueeze(-1)
    norms = torch.linalg.vector_norm(grad.reshape(batch, -1), dim=1)
    return (norms, grad) if return_grad else norms


def shared_shift_gradient_norms(grad, mask=None) -> np.ndarray:
    """||d/d delta l(z + 1 delta^T)|| per sample: the norm of the per-position gradients summed over
    the real positions. Shifting every position by delta shifts the pooled mean by delta, so this is
    the Lipschitz estimate in the pooled space where W1 and D are measured (grad: (B, T, d))."""
    g = grad.detach().cpu().double().numpy() if isinstance(grad, torch.Tensor) else np.asarray(grad, np.float64)
    if g.ndim != 3:
        raise ValueError(f"grad must be (batch, positions, features), got shape {g.shape}")
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape != g.shape[:2]:
            raise ValueError(f"mask shape {m.shape} does not match grad's positions {g.shape[:2]}")
        g = g * m[..., None]
    return np.linalg.norm(g.sum(axis=1), axis=1)


def _finite_values(values) -> tuple[np.ndarray, int]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(values)
    return values[finite], int((~finite).sum())


def gradient_norm_stats(norms) -> dict[str, float | int]:
    """Summary of the per-sample gradient-norm distribution (the L_log candidates).

    Non-finite norms (overflowed backward passes) are dropped and counted in ``n_nonfinite`` so a
    changed sample count is visible rather than silent.
    """
    values, n_bad = _finite_values(norms)
    if values.size == 0:
        raise ValueError("no finite gradient norms to summarise")
    stats: dict[str, float | int] = {
        "n": int(values.size),
        "n_nonfinite": n_bad,
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for name, q in _QUANTILES.items():
        stats[name] = float(np.percentile(values, q))
    return stats


def gradient_norm_histogram(norms, bins: int | np.ndarray = 30) -> dict[str, list]:
    """Histogram of the finite gradient norms as plain lists (JSON-ready), for the figure."""
    values, _ = _finite_values(norms)
    if values.size == 0:
        raise ValueError("no finite gradient norms to histogram")
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.astype(int).tolist(), "edges": edges.tolist()}


def linear_softmax_lipschitz(W, y: int | None = None) -> float:
    """Exact Lipschitz constant of z -> log softmax(W z + b)_y, whatever the bias b.

    grad_z = W_y - sum_j p_j W_j is W_y minus a convex combination of the rows, so its norm is at
    most max_j ||W_y - W_j||; the supremum is reached in the limit p -> e_j for the farthest row
    (a vertex of the rows' convex hull), so it is the constant itself. Over all y it is the
    diameter of the set of rows, itself at most 2 max_j ||W_j||.
    """
    W = np.asarray(W, dtype=np.float64).reshape(len(W), -1)
    rows = W if y is None else W[[y]]
    gaps = rows[:, None, :] - W[None, :, :]
    return float(np.sqrt((gaps**2).sum(-1)).max())


def equal_length_neighbours(arrays, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's k nearest others of the same shape, by the Frobenius norm of the difference
    (the norm the gradient L uses): indices (n, k), -1 where its shape has fewer other members,
    and the distances (inf there). Sequences of different lengths are not points of one space,
    so they never pair."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n = len(arrays)
    index = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), np.inf)
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(np.shape(a)), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        d = np.full((len(members), len(members)), np.inf)
        for a, i in enumerate(members):
            zi = np.asarray(arrays[i], dtype=np.float64)
            for b in range(a + 1, len(members)):
                d[a, b] = d[b, a] = float(np.linalg.norm(zi - np.asarray(arrays[members[b]], dtype=np.float64)))
        take = min(k, len(members) - 1)
        order = np.argsort(d, axis=1, kind="stable")[:, :take]
        for a, i in enumerate(members):
            index[i, :take] = np.asarray(members)[order[a]]
            dist[i, :take] = d[a, order[a]]
    return index, dist


def secant_lipschitz(own_scores, neighbour_scores, distances) -> np.ndarray:
    """Per sample i, the largest secant slope |l_i(z_i) - l_i(z_j)| / ||z_i - z_j|| over its
    neighbours j: a lower bound on L_log, with no derivative (the paper's 2-NN estimate).

    ``own_scores[i]`` = l(c, z_i, y_i); ``neighbour_scores[i, c]`` = l(c, z_j, y_i), sample i's
    target scored with its c-th neighbour's representation, at distance ``distances[i, c]``. By the
    mean-value theorem each slope is at most the largest gradient norm on the segment; short
    segments bring it close to the local gradient norm. Neighbours with a non-finite or zero
    distance are ignored; a sample with none gets NaN.
    """
    own = np.asarray(own_scores, dtype=np.float64)
    other = np.asarray(neighbour_scores, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    if own.ndim != 1 or other.shape != d.shape or other.shape[:1] != own.shape:
        raise ValueError(f"need own (n,), neighbour scores and distances (n, k); got {own.shape}, {other.shape}, "
                         f"{d.shape}")
    usable = np.isfinite(d) & (d > 0) & np.isfinite(other)
    slopes = np.where(usable, np.abs(own[:, None] - np.where(usable, other, 0.0)) / np.where(usable, d, 1.0), -np.inf)
    best = slopes.max(axis=1)
    return np.where(np.isfinite(best), best, np.nan)


# --------------------------------------------------------------------------------------------
# Diameter and effective diameter
# --------------------------------------------------------------------------------------------


def _as_rows(X) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        raise ValueError("expected one representation per row, got a 1-D array")
    X = X.reshape(len(X), -1)
    if len(X) < 2:
        raise ValueError(f"need at least 2 representations, got {len(X)}")
    if not np.all(np.isfinite(X)):
        raise ValueError("representations contain non-finite values")
    return X


def _squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """||a - b||^2 for all row pairs through one matrix product (inputs should be centred)."""
    sq = (A**2).sum(1)[:, None] + (B**2).sum(1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(sq, 0.0)


def diameter(
    X,
    *,
    quantile: float = 1.0,
    max_pairs: int | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
) -> float:
    """Largest (or a high quantile of the) pairwise Euclidean distance between rows of X.

    With ``max_pairs=None`` every one of the n(n-1)/2 pairs is visited in row blocks, so the
    maximum is exact at O(n^2 d) time and O(chunk_size * n) memory; that is the default because
    the theorem needs a supremum and subsampled pairs can only underestimate it. A ``quantile``
    below 1 (e.g. 0.99) gives a robust size that one outlier cannot set; it keeps all pair
    distances, O(n^2) memory, fine for a few thousand rows. ``max_pairs`` switches to that many
    uniformly drawn distinct pairs (a lower bound on the maximum) for samples too large to scan.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    X = _as_rows(X)
    X = X - X.mean(0)  # distances are shift-invariant; centring limits cancellation
    n = len(X)
    total = n * (n - 1) // 2
    if max_pairs is not None and max_pairs < total:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        rng = np.random.default_rng(seed)
        i = rng.integers(n, size=max_pairs)
        j = (i + rng.integers(1, n, size=max_pairs)) % n
        dists = np.concatenate(
            [
                np.linalg.norm(X[i[s : s + chunk_size]] - X[j[s : s + chunk_size]], axis=1)
                for s in range(0, max_pairs, chunk_size)
            ]
        )
        return float(dists.max() if quantile == 1.0 else np.quantile(dists, quantile))

    best = 0.0
    kept = []
    for start in range(0, n, chunk_size):
        block = X[start : start + chunk_size]
        sq = _squared_distances(block, X[start:])
        upper = np.triu(np.ones(sq.shape, dtype=bool), k=1)  # pairs (a, b) with b after a
        if quantile == 1.0:
            best = max(best, float(sq[upper].max(initial=0.0)))
        else:
            kept.append(np.sqrt(sq[upper]))
    if quantile == 1.0:
        return math.sqrt(best)
    return float(np.quantile(np.concatenate(kept), quantile))


def reference_diameter(
    X, *, n_rows: int = 500, n_pairs: int = 200, seed_rows: int = 42, seed_pairs: int = 123
) -> float:
    """The earlier code's D, kept for reference-compatible numbers: max(D_std, D_pairs).

    On a subsample of ``n_rows`` rows, D_std = (std of all entries, not centred per feature) *
    sqrt(d) and D_pairs = largest distance over ``n_pairs`` pairs drawn with replacement. The
    random draws follow the same recipe but not the same generator, so subsample-level digits may
    differ from the original numbers.
    """
    X = _as_rows(X)
    rows = np.random.default_rng(seed_rows).choice(len(X), size=min(n_rows, len(X)), replace=False)
    sub = X[rows]
    d_std = float(sub.std() * math.sqrt(sub.shape[1]))
    rng = np.random.default_rng(seed_pairs)
    i = rng.integers(len(sub), size=n_pairs)
    j = rng.integers(len(sub), size=n_pairs)
    d_pairs = float(np.linalg.norm(sub[i] - sub[j], axis=1).max())
    return max(d_std, d_pairs)


def covariance_eigenvalues(X) -> np.ndarray:
    """Eigenvalues of the sample covariance (ddof=1), largest first, negatives clipped to 0.

    Computed from the smaller of the n x n Gram and the d x d scatter matrix, which share their
    non-zero spectrum, so n << d (1000 samples of 4096 features) stays cheap.
    """
    X = _as_rows(X)
    Xc = X - X.mean(0)
    n, d = Xc.shape
    small = Xc @ Xc.T if n <= d else Xc.T @ Xc
    eig = np.linalg.eigvalsh(small) / (n - 1)
    return np.clip(eig, 0.0, None)[::-1]


def participation_ratio(X=None, *, eigenvalues=None) -> float:
    """PR = (sum lambda)^2 / sum lambda^2 of the covariance: the number of directions in use.

    It is d for isotropic data and 1 when all variance lies on one axis. Pass either the
    representations or precomputed covariance eigenvalues.
    """
    lam = _eigenvalues(X, eigenvalues)
    return float(lam.sum() ** 2 / (lam**2).sum())


def _eigenvalues(X, eigenvalues) -> np.ndarray:
    if (X is None) == (eigenvalues is None):
        raise ValueError("pass exactly one of X and eigenvalues")
    lam = covariance_eigenvalues(X) if eigenvalues is None else np.sort(np.asarray(eigenvalues, float))[::-1]
    if lam.size == 0 or lam.sum() <= 0 or np.any(lam < 0) or not np.all(np.isfinite(lam)):
        raise ValueError("covariance spectrum must be finite, non-negative and not all zero")
    return lam


@dataclass(frozen=True)
class EffectiveDiameter:
    """D_eff with the quantities it is built from."""

    d_eff: float
    participation_ratio: float
    captured_variance: float  # variance in the top-PR principal directions (fractional last one)
    total_variance: float

    def as_dict(self) -> dict[str, float]:
        return {
            "D_eff": self.d_eff,
            "participation_ratio": self.participation_ratio,
            "captured_variance": self.captured_variance,
            "total_variance": self.total_variance,
        }


def effective_diameter(X=None, *, eigenvalues=None) -> EffectiveDiameter:
    """D_eff = 2 sqrt(sum_{k <= PR} lambda_k), the participation-ratio support size of §A.3.

    The sum runs over the floor(PR) largest eigenvalues plus the fraction PR - floor(PR) of the
    next one, so D_eff moves continuously with PR. It models the effective support as the ball
    around the mean whose radius is the RMS spread inside the PR principal directions: exact for
    data on a k-sphere, and ignoring the low-variance tail of directions that make up most of d
    but little of the spread. It is an estimate of a typical support size, not a certified bound
    (the largest pairwise distance can exceed it); compare with ``diameter`` of the same rows.
    """
    lam = _eigenvalues(X, eigenvalues)
    pr = float(lam.sum() ** 2 / (lam**2).sum())
    whole = min(int(math.floor(pr)), lam.size)
    captured = float(lam[:whole].sum())
    if whole < lam.size:
        captured += (pr - whole) * float(lam[whole])
    return EffectiveDiameter(
        d_eff=2.0 * math.sqrt(captured),
        participation_ratio=pr,
        captured_variance=captured,
        total_variance=float(lam.sum()),
    )


# --------------------------------------------------------------------------------------------
# The L_log summary that goes into results
# --------------------------------------------------------------------------------------------


def lipschitz_summary(
    norms,
    X,
    *,
    robust_quantile: float = 0.99,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict[str, float | int]:
    """Gradient-norm statistics, D (max and robust quantile), PR, D_eff and the L*D products.

    ``X`` holds the representations whose size enters the bound (for §A.3's D_S, the modal and
    text rows stacked). Products are given for L = mean, p95 and max of the gradient norms,
    because the paper uses more than one of them.
    """
    stats = gradient_norm_stats(norms)
    d_max = diameter(X, max_pairs=max_pairs, seed=seed)
    d_robust = diameter(X, quantile=robust_quantile, max_pairs=max_pairs, seed=seed)
    eff = effective_diameter(X)
    out: dict[str, float | int] = {f"L_{key}": value for key, value in stats.items()}
    out.update(
        {
            "D": d_max,
            f"D_q{round(robust_quantile * 100):d}": d_robust,
            "participation_ratio": eff.participation_ratio,
            "D_eff": eff.d_eff,
        }
    )
    for which in ("mean", "p95", "max"):
        out[f"L_{which}_x_D"] = stats[which] * d_max
        out[f"L_{which}_x_D_eff"] = stats[which] * eff.d_eff
    return out
