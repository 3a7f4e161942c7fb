"""Representation shift between two models that read the same token ids (a base LLM and its descendant).

Per layer, over the valid tokens (BOS and pads excluded) of all texts:
- `cosine_of_means`: cos(mean_t a_t, mean_t b_t), and `l2_of_means` = ||mean a - mean b||;
- `mean_token_l2` = mean_t ||a_t - b_t|| (the same position in both models), `relative_token_l2` = that
  over mean_t ||a_t||, and `mean_token_cosine` = mean_t cos(a_t, b_t);
- linear CKA (Kornblith et al. 2019) of two row-aligned matrices X (n x d1), Y (n x d2), columns
  centred: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Over tokens (rows: token positions) or over
  items (rows: each text's mean over its valid tokens). 1 for identical inputs, invariant to an
  orthogonal rotation and an isotropic scaling of either side.

A JumpReLU sparse autoencoder in the Gemma Scope `params.npz` layout (W_enc d x F, b_enc F, threshold
F, W_dec F x d, b_dec d) gives a shared sparse basis: f(x) = relu(x W_enc + b_enc) * [x W_enc + b_enc >
threshold], x_hat = f W_dec + b_dec. Per token: the Jaccard of the two active sets {f > 0} (both empty: 1)
and the cosine of the two activation vectors (both zero: 1, one zero: 0); per model: the fraction of
variance explained 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 and the relative MSE
sum ||x - x_hat||^2 / sum ||x||^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAE_KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float("nan")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of row-aligned x (n, d1) and y (n, d2); nan when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows on both sides ({x.shape[0]} vs {y.shape[0]})")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):  # n x n Grams are the smaller products
        k, g = x @ x.T, y @ y.T
        cross, nx, ny = float((k * g).sum()), np.linalg.norm(k), np.linalg.norm(g)
    else:
        cross = float(np.linalg.norm(y.T @ x) ** 2)
        nx, ny = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    return cross / float(nx * ny) if nx > 0 and ny > 0 else float("nan")


@dataclass
class LayerShift:
    """Running sums of one layer over batches of row-aligned valid tokens."""

    n: int = 0
    sum_a: np.ndarray | None = None
    sum_b: np.ndarray | None = None
    token_l2: float = 0.0
    token_norm_a: float = 0.0
    token_cos: float = 0.0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"token rows differ in shape: {a.shape} vs {b.shape}")
        if self.sum_a is None:
            self.sum_a, self.sum_b = np.zeros(a.shape[1]), np.zeros(b.shape[1])
        self.n += a.shape[0]
        self.sum_a += a.sum(axis=0)
        self.sum_b += b.sum(axis=0)
        self.token_l2 += float(np.linalg.norm(a - b, axis=1).sum())
        norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        self.token_norm_a += float(norm_a.sum())
        denom = norm_a * norm_b
        self.token_cos += float(np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), 0).sum())

    def result(self) -> dict:
        if not self.n:
            return {}
        mean_a, mean_b = self.sum_a / self.n, self.sum_b / self.n
        return {"cosine_of_means": cosine(mean_a, mean_b), "l2_of_means": float(np.linalg.norm(mean_a - mean_b)),
                "mean_token_l2": self.token_l2 / self.n,
                "relative_token_l2": self.token_l2 / self.token_norm_a if self.token_norm_a else float("nan"),
                "mean_token_cosine": self.token_cos / self.n, "norm_of_mean_a": float(np.linalg.norm(mean_a)),
                "n_tokens": self.n}


@dataclass
class JumpReluSae:
    w_enc: np.ndarray  # (d, F)
    b_enc: np.ndarray  # (F,)
    threshold: np.ndarray  # (F,)
    w_dec: np.ndarray  # (F, d)
    b_dec: np.ndarray  # (d,)

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        pre = np.asarray(x, np.float32) @ self.w_enc + self.b_enc
        return np.where(pre > self.threshold, np.maximum(pre, 0.0), 0.0).astype(np.float32)

    def decode(self, f: np.ndarray) -> np.ndarray:
        return f @ self.w_dec + self.b_dec


def load_sae(path: str | Path) -> JumpReluSae:
    """A Gemma Scope params.npz (or the directory holding one); a missing key or shape mismatch is a ValueError."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "params.npz"
    with np.load(path) as params:
        missing = [k for k in SAE_KEYS if k not in params]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)} (a JumpReLU SAE needs {', '.join(SAE_KEYS)})")
        sae = JumpReluSae(*(np.asarray(params[k], np.float32) for k in SAE_KEYS))
    d, f = sae.w_enc.shape
    if sae.w_dec.shape != (f, d) or sae.b_enc.shape != (f,) or sae.threshold.shape != (f,) or sae.b_dec.shape != (d,):
        raise ValueError(f"{path}: inconsistent SAE shapes (W_enc {sae.w_enc.shape}, W_dec {sae.w_dec.shape})")
    return sae


def active_jaccard(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Per row: |A and B| / |A or B| of the active features (> 0); 1 where both sets are empty."""
    a, b = np.asarray(fa) > 0, np.asarray(fb) > 0
    union = (a | b).sum(axis=1)
    return np.where(union > 0, (a & b).sum(axis=1) / np.maximum(union, 1), 1.0)


def row_cosines(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Per row cosine; 1 where both rows are zero, 0 where only one is."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    both_zero = (na == 0) & (nb == 0)
    denom = np.where(na * nb > 0, na * nb, 1.0)
    return np.where(both_zero, 1.0, (fa * fb).sum(axis=1) / denom)


@dataclass
class SaeShift:
    """Running SAE comparisons of row-aligned tokens of two models at the SAE's site."""

    sae: JumpReluSae
    n: int = 0
    jaccard: float = 0.0
    feature_cosine: float = 0.0
    l0: dict = field(default_factory=lambda: {"a": 0.0, "b": 0.0})
    sq_err: dict = field(default_factory=lambda: {"a": 0.0, "b": 0.0})
    sq_norm: dict = field(default_factory=lambda: {"a": 0.0, "b": 0.0})
    sums: dict = field(default_factory=dict)

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        features = {}
        for side, x in (("a", a), ("b", b)):
            x = np.asarray(x, np.float64)
            f = self.sae.encode(x)
            features[side] = f
            self.l0[side] += float((f > 0).sum())
            self.sq_err[side] += float(((x - self.sae.decode(f)) ** 2).sum())
            self.sq_norm[side] += float((x ** 2).sum())
            self.sums.setdefault(side, np.zeros(x.shape[1]))
            self.sums[side] = self.sums[side] + x.sum(axis=0)
        self.n += len(a)
        self.jaccard += float(active_jaccard(features["a"], features["b"]).sum())
        self.feature_cosine += float(row_cosines(features["a"], features["b"]).sum())

    def result(self) -> dict:
        if not self.n:
            return {}
        out = {"sae_mean_jaccard": self.jaccard / self.n, "sae_mean_feature_cosine": self.feature_cosine / self.n}
        for side in ("a", "b"):
            mean = self.sums[side] / self.n
            total_var = self.sq_norm[side] - self.n * float(mean @ mean)  # sum ||x - mean x||^2
            out[f"sae_l0_{side}"] = self.l0[side] / self.n
            out[f"sae_fve_{side}"] = 1.0 - self.sq_err[side] / total_var if total_var > 0 else float("nan")
            norm = self.sq_norm[side]
            out[f"sae_relative_mse_{side}"] = self.sq_err[side] / norm if norm else float("nan")
        return out
