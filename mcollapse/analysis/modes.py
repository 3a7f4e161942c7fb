"""Mode alignment: along which directions does the modality vary where text does not?

The modes are the top principal directions u_k (eigenvalues lambda_k) of the modal covariance
Sigma_M of pooled adapter outputs. Each mode gets the alignment score

    rho_k = u_k^T Sigma_T u_k / lambda_k,

the text variance along u_k relative to the modal variance along it, with Sigma_T the covariance
of text representations taken in the same space, around the text mean. rho_k ~ 1: the decoder has
seen this kind of variation during training (text-aligned, TA); rho_k ~ 0: it has not
(modality-specific, MS, rho_k < ms_threshold, the paper's strict ``<``).

rho is blind to scale: when the adapter outputs are larger than the token embeddings (or pooled over
fewer positions, so they vary more), every rho_k shrinks by the same factor and every mode comes out
MS. Beside it we report the scale-normalised

    rho~_k = rho_k * tr(Sigma_M) / tr(Sigma_T),

which is 1 along every mode when text is a scaled copy of the modal cloud. ``rho_normalization``
says which of the two decides MS vs TA: ``none`` (rho, the paper's definition) or ``trace`` (rho~).

The basis comes from a thin SVD of the centred data, never from a d x d covariance when there are
fewer samples than dimensions: Sigma_M then has a null space whose eigenvalues are rounding noise
and whose rho values explode, so only modes inside the numerical rank are returned. u_k^T Sigma_T u_k
is the variance of the text projections, so no d x d matrix is formed anywhere.

The basis and its MS/TA labels are computed once per model x dataset and saved (`save_basis`) for
the experiments that act on the modes (gradient isotropy, ablation, MS swap).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcollapse.analysis.stats import spearman
from mcollapse.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "mcollapse.eigenbasis/2"
DEFAULT_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
RHO_NORMALIZATIONS = ("none", "trace")


def _float_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (samples, features) matrix, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


@dataclass(frozen=True)
class Eigenbasis:
    """Top principal directions of a data cloud.

    vectors (k, d) are orthonormal rows u_k, sorted by decreasing eigenvalue; each is signed so
    that its largest-magnitude coordinate is positive, which makes the basis reproducible across
    runs and sample orders. eigenvalues are sample covariance eigenvalues (ddof=1).
    total_variance is the trace of the full covariance, so shares of *all* variance are available
    even though only k modes are kept.
    """

    mean: np.ndarray
    vectors: np.ndarray
    eigenvalues: np.ndarray
    total_variance: float
    n_samples: int

    @property
    def n_modes(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """lambda_k / trace(Sigma_M): e.g. the Mode-0 share annotated in the paper's Fig. 2."""
        return self.eigenvalues / self.total_variance

    def project(self, X, centre: bool = True) -> np.ndarray:
        """Coordinates (n, k) of rows of X along the modes, around the modal mean unless centre=False."""
        rows = np.asarray(X, dtype=np.float64)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} features, got {rows.shape[-1]}")
        if centre:
            rows = rows - self.mean
        return rows @ self.vectors.T


def eigenbasis(X, n_modes: int = 100) -> Eigenbasis:
    """Top ``n_modes`` eigenvectors of the sample covariance of X (n, d), from a thin SVD of the centred data.

    The SVD is taken through the Gram matrix of the smaller side: with n < d the n x n matrix
    Xc Xc^T, whose eigenvectors v_k give u_k = Xc^T v_k / s_k; otherwise the d x d scatter
    Xc^T Xc. For the top modes this agrees with a direct SVD to rounding (squaring only costs
    precision in modes carrying < ~1e-12 of the top variance, which the rank cut drops) and is
    several times faster for activation-sized matrices. Fewer modes are returned, with a warning,
    when the centred data has lower numerical rank (at most n - 1): modes past the rank would be
    arbitrary null-space directions with ~0 eigenvalues and exploding rho.
    """
    if n_modes < 1:
        raise ValueError(f"n_modes must be positive, got {n_modes}")
    data = _float_matrix(X, "modal data")
    n, d = data.shape
    mean = data.mean(axis=0)
    centred = data - mean
    wide = n < d
    values, eigenvectors = np.linalg.eigh(centred @ centred.T if wide else centred.T @ centred)
    values, eigenvectors = values[::-1], eigenvectors[:, ::-1]  # descending
    tolerance = max(values[0], 0.0) * max(n, d) * np.finfo(np.float64).eps * 10
    rank = int(np.count_nonzero(values > tolerance))
    if rank == 0:
        raise ValueError("modal data has no variance; there are no modes")
    k = min(n_modes, rank)
    if k < n_modes:
        logger.warning("only %d of the %d requested modes exist (rank of %d centred samples in %d dims)",
                       k, n_modes, n, d)
    if wide:
        vectors = (centred.T @ eigenvectors[:, :k]).T
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    else:
        vectors = np.ascontiguousarray(eigenvectors[:, :k].T)
    pivots = np.argmax(np.abs(vectors), axis=1)
    vectors *= np.sign(vectors[np.arange(k), pivots])[:, None]
    scale = 1.0 / (n - 1)
    return Eigenbasis(
        mean=mean,
        vectors=vectors,
        eigenvalues=values[:k] * scale,
        total_variance=float(np.einsum("ij,ij->", centred, centred) * scale),
        n_samples=n,
    )


@dataclass(frozen=True)
class ModeAlignment:
    """rho per mode, the MS/TA split and the paper's Table 11 summary for one eigenbasis.

    ms_variance_share is the MS fraction of the variance of the k kept modes (Table 11's "MS var"
    over the top 100); ms_share_of_total is the MS fraction of all modal variance. sensitivity and
    sensitivity_variance_share give the MS count and share at each threshold in ``thresholds``
    (which always includes ms_threshold), the check behind the claim that the split does not hinge
    on 0.5. rho is the paper's rho, rho_normalised the trace-normalised one; rho_normalization
    names the one that the split and the sensitivity are taken on (`deciding_rho`).
    """

    rho: np.ndarray
    rho_normalised: np.ndarray
    rho_normalization: str
    text_variance: np.ndarray
    modal_variance: np.ndarray
    total_modal_variance: float
    total_text_variance: float
    ms_threshold: float
    thresholds: tuple[float, ...]
    n_text: int
    is_ms: np.ndarray
    n_ms: int
    n_ta: int
    rho_0: float
    mean_rho_top10: float
    ms_variance_share: float
    ms_share_of_total: float
    sensitivity: dict[float, int]
    sensitivity_variance_share: dict[float, float]

    @property
    def labels(self) -> np.ndarray:
        """'MS' or 'TA' per mode."""
        return np.where(self.is_ms, "MS", "TA")

    @property
    def deciding_rho(self) -> np.ndarray:
        """The rho compared with the thresholds: rho itself or the trace-normalised one."""
        return self.rho_normalised if self.rho_normalization == "trace" else self.rho

    @property
    def trace_ratio(self) -> float:
        """tr(Sigma_M) / tr(Sigma_T): the factor between the two rho."""
        return self.total_modal_variance / self.total_text_variance

    @property
    def empty_classes(self) -> list[str]:
        """'MS' and/or 'TA' when no mode falls in that class (their controls are then empty)."""
        return [name for name, count in (("MS", self.n_ms), ("TA", self.n_ta)) if count == 0]

    def summary(self) -> dict[str, float | str]:
        """Flat metric -> value mapping for long-format result rows."""
        row: dict[str, float | str] = {
            "n_modes": int(self.rho.size),
            "n_text": self.n_text,
            "ms_threshold": self.ms_threshold,
            "rho_normalization": self.rho_normalization,
            "rho_0": self.rho_0,
            "mean_rho_top10": self.mean_rho_top10,
            "rho_normalised_0": float(self.rho_normalised[0]),
            "mean_rho_normalised_top10": float(self.rho_normalised[:10].mean()),
            "trace_ratio": self.trace_ratio,
            "n_ms": self.n_ms,
            "n_ta": self.n_ta,
            "ms_variance_share": self.ms_variance_share,
            "ms_share_of_total": self.ms_share_of_total,
            "mode0_variance_share": float(self.modal_variance[0] / self.total_modal_variance),
        }
        for threshold in self.thresholds:
            row[f"n_ms@{threshold:g}"] = self.sensitivity[threshold]
            row[f"ms_variance_share@{threshold:g}"] = self.sensitivity_variance_share[threshold]
        return row


def _check_normalization(rho_normalization: str) -> str:
    if rho_normalization not in RHO_NORMALIZATIONS:
        raise ValueError(f"rho_normalization must be one of {', '.join(RHO_NORMALIZATIONS)}, "
                         f"got {rho_normalization!r}")
    return rho_normalization


def _alignment(
    text_variance: np.ndarray,
    total_text_variance: float,
    basis: Eigenbasis,
    n_text: int,
    ms_threshold: float,
    thresholds: Sequence[float],
    rho_normalization: str,
) -> ModeAlignment:
    """Every derived quantity from the text variances along the modes (shared by compute and load)."""
    modal = basis.eigenvalues
    rho = text_variance / modal
    if not total_text_variance > 0:
        raise ValueError("text data has no variance; rho cannot be normalised by its trace")
    rho_normalised = rho * (basis.total_variance / total_text_variance)
    deciding = rho_normalised if _check_normalization(rho_normalization) == "trace" else rho
    levels = tuple(sorted({float(t) for t in thresholds} | {float(ms_threshold)}))
    top = float(modal.sum())

    def split(threshold: float) -> tuple[np.ndarray, int, float]:
        mask = deciding < threshold
        return mask, int(mask.sum()), float(modal[mask].sum() / top)

    is_ms, n_ms, share = split(ms_threshold)
    return ModeAlignment(
        rho=rho,
        rho_normalised=rho_normalised,
        rho_normalization=rho_normalization,
        text_variance=text_variance,
        modal_variance=modal,
        total_modal_variance=basis.total_variance,
        total_text_variance=float(total_text_variance),
        ms_threshold=float(ms_threshold),
        thresholds=levels,
        n_text=int(n_text),
        is_ms=is_ms,
        n_ms=n_ms,
        n_ta=int(rho.size - n_ms),
        rho_0=float(rho[0]),
        mean_rho_top10=float(rho[:10].mean()),
        ms_variance_share=share,
        ms_share_of_total=float(modal[is_ms].sum() / basis.total_variance),
        sensitivity={t: split(t)[1] for t in levels},
        sensitivity_variance_share={t: split(t)[2] for t in levels},
    )


def mode_alignment(
    basis: Eigenbasis,
    text,
    ms_threshold: float = 0.5,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    rho_normalization: str = "none",
) -> ModeAlignment:
    """rho_k = var(text projected on u_k) / lambda_k for text (m, d) in the same space as the modes,
    and its trace-normalised companion; ``rho_normalization`` picks the one that splits MS / TA.

    The text variance is taken around the text mean (ddof=1): a constant offset between the
    clouds is a W1 matter, not a difference in the variation the decoder has seen.
    """
    _check_normalization(rho_normalization)
    rows = _float_matrix(text, "text data")
    if rows.shape[1] != basis.dim:
        raise ValueError(
            f"text has {rows.shape[1]} features but the modes live in {basis.dim}; "
            "rho needs text and modal representations from the same space"
        )
    centred = rows - rows.mean(axis=0)
    projections = centred @ basis.vectors.T
    scale = 1.0 / (rows.shape[0] - 1)
    text_variance = np.einsum("ik,ik->k", projections, projections) * scale
    total_text_variance = float(np.einsum("ij,ij->", centred, centred) * scale)
    return _alignment(text_variance, total_text_variance, basis, rows.shape[0], ms_threshold, thresholds,
                      rho_normalization)


def save_basis(path, basis: Eigenbasis, alignment: ModeAlignment | None = None, meta: dict | None = None) -> Path:
    """Write the basis, its MS/TA labels and JSON metadata to one .npz file, atomically.

    The file appears at ``path`` exactly (no suffix added) only once it is complete, so a reader
    never sees a half-written artifact. meta should say where the basis came from (model, revision,
    dataset, hook, text source, sample count); values JSON cannot encode are stored as strings.
    """
    target = Path(path)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "mean": basis.mean,
        "vectors": basis.vectors,
        "eigenvalues": basis.eigenvalues,
        "total_variance": np.array(basis.total_variance),
        "n_samples": np.array(basis.n_samples),
        "meta_json": np.array(json.dumps(meta or {}, sort_keys=True, default=str)),
    }
    if alignment is not None:
        if alignment.rho.size != basis.n_modes:
            raise ValueError(f"alignment has {alignment.rho.size} modes, basis has {basis.n_modes}")
        arrays.update(
            text_variance=alignment.text_variance,
            total_text_variance=np.array(alignment.total_text_variance),
            rho_normalization=np.array(alignment.rho_normalization),
            rho=alignment.rho,
            rho_normalised=alignment.rho_normalised,
            is_ms=alignment.is_ms,
            labels=alignment.labels,
            ms_threshold=np.array(alignment.ms_threshold),
            thresholds=np.array(alignment.thresholds),
            n_text=np.array(alignment.n_text),
        )
    from mcollapse.store import write_npz  # the one atomic, durable writer

    write_npz(target, **arrays)
    return target


def load_basis(path) -> tuple[Eigenbasis, ModeAlignment | None, dict]:
    """Read an artifact written by `save_basis`: (basis, alignment or None, meta)."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"eigenbasis file not found: {source} (run experiment=modes first)")
    try:
        with np.load(source, allow_pickle=False) as data:
            stored = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise UserError(f"{source} is not an eigenbasis file: {error}") from None
    if "format" not in stored or str(stored["format"]) != FORMAT:
        found = str(stored["format"]) if "format" in stored else "none"
        raise UserError(f"{source} has format {found!r}, expected {FORMAT!r}; recompute the modes")
    basis = Eigenbasis(
        mean=stored["mean"],
        vectors=stored["vectors"],
        eigenvalues=stored["eigenvalues"],
        total_variance=float(stored["total_variance"]),
        n_samples=int(stored["n_samples"]),
    )
    alignment = None
    if "rho" in stored:
        alignment = _alignment(
            stored["text_variance"],
            float(stored["total_text_variance"]),
            basis,
            int(stored["n_text"]),
            float(stored["ms_threshold"]),
            tuple(float(t) for t in stored["thresholds"]),
            str(stored["rho_normalization"]),
        )
    return basis, alignment, json.loads(str(stored["meta_json"]))


def mode_gradient_magnitudes(grads, basis: Eigenbasis, mask=None) -> np.ndarray:
    """Per-sample gradient magnitude along each mode, (n, k); rows are independent, so batches stream.

    grads (n, d): one gradient per sample (w.r.t. a pooled input, or the reference's
    mean-over-positions gradient); magnitude |<g, u_k>|.
    grads (n, T, d): per-position gradients w.r.t. the adapter-output sequence; magnitude
    sqrt(sum_t <g_t, u_k>^2) over valid positions (mask (n, T), true = valid), the norm of the
    loss gradient restricted to mode k at every position. Unlike the pooled gradient it neither
    cancels opposite signs across positions nor shrinks with 1/T.
    """
    values = np.asarray(grads, dtype=np.float64)
    if values.shape[-1] != basis.dim:
        raise ValueError(f"gradients have {values.shape[-1]} features, the modes {basis.dim}")
    if values.ndim == 2:
        if mask is not None:
            raise ValueError("a mask applies to per-position gradients (n, T, d) only")
        return np.abs(values @ basis.vectors.T)
    if values.ndim != 3:
        raise ValueError(f"gradients must be (n, d) or (n, T, d), got shape {values.shape}")
    along = values @ basis.vectors.T  # (n, T, k)
    if mask is not None:
        valid = np.asarray(mask, dtype=bool)
        if valid.shape != values.shape[:2]:
            raise ValueError(f"mask shape {valid.shape} does not match gradients {values.shape[:2]}")
        along = along * valid[..., None]
    return np.sqrt(np.einsum("ntk,ntk->nk", along, along))


@dataclass(frozen=True)
class GradientIsotropy:
    """Does the decoder's loss respond less to MS modes than to TA modes?

    g_k aggregates the per-sample magnitudes of mode k over samples (``statistic``: "mean", the
    reference and paper; or "rms"). ratio = g_ta / g_ms, the means of g_k over TA and MS modes
    (nan when a class is empty, inf when only the MS modes get no gradient); spearman_r and
    spearman_p relate rho_k to g_k across modes. An isotropic decoder gives ratio ~ 1 and no rank
    correlation.
    """

    g_k: np.ndarray
    g_k_std: np.ndarray
    rho: np.ndarray
    is_ms: np.ndarray
    statistic: str
    n_samples: int
    g_ta: float
    g_ms: float
    ratio: float
    spearman_r: float
    spearman_p: float

    def summary(self) -> dict[str, float]:
        """Flat metric -> value mapping for long-format result rows."""
        return {
            "n_samples": self.n_samples,
            "n_ms": int(self.is_ms.sum()),
            "n_ta": int((~self.is_ms).sum()),
            "g_ta": self.g_ta,
            "g_ms": self.g_ms,
            "g_ta_over_g_ms": self.ratio,
            "spearman_r": self.spearman_r,
            "spearman_p": self.spearman_p,
        }


def gradient_isotropy(magnitudes, alignment: ModeAlignment, statistic: str = "mean") -> GradientIsotropy:
    """Aggregate `mode_gradient_magnitudes` output (n, k) against the MS/TA split of the same basis."""
    values = np.asarray(magnitudes, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != alignment.rho.size:
        raise ValueError(f"magnitudes must be (samples, {alignment.rho.size}), got shape {values.shape}")
    if values.shape[0] < 1 or not np.all(np.isfinite(values)):
        raise ValueError("magnitudes need at least one sample and finite values")
    if statistic == "mean":
        g_k = values.mean(axis=0)
    elif statistic == "rms":
        g_k = np.sqrt(np.mean(values**2, axis=0))
    else:
        raise ValueError(f"statistic must be 'mean' or 'rms', got {statistic!r}")
    is_ms = alignment.is_ms
    g_ta = float(g_k[~is_ms].mean()) if (~is_ms).any() else float("nan")
    g_ms = float(g_k[is_ms].mean()) if is_ms.any() else float("nan")
    correlation = spearman(alignment.rho, g_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(g_ta) / np.float64(g_ms))  # inf when MS modes get no gradient at all
    return GradientIsotropy(
        g_k=g_k,
        g_k_std=values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(g_k),
        rho=alignment.rho,
        is_ms=is_ms,
        statistic=statistic,
        n_samples=int(values.shape[0]),
        g_ta=g_ta,
        g_ms=g_ms,
        ratio=ratio,
        spearman_r=correlation["r"],
        spearman_p=correlation["p"],
    )
