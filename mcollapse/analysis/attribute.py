"""Perceptual-attribute probes and steering math: ridge regression on a factor (R^2), the unit
probe direction, the shift added along it, and the expected rating over the digit tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcollapse.analysis.transfer import standardizer


@dataclass
class RidgeFit:
    """y ~ ((x - shift) / scale) @ coef + intercept, fitted with penalty `lam` on z-scored features."""

    coef: np.ndarray
    intercept: float
    shift: np.ndarray
    scale: np.ndarray

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.shift) / self.scale) @ self.coef + self.intercept

    def direction(self) -> np.ndarray:
        """The unit direction in the raw feature space along which the prediction grows fastest."""
        raw = self.coef / self.scale
        norm = float(np.linalg.norm(raw))
        return raw / norm if norm > 0 else raw


def fit_ridge(X: np.ndarray, y: np.ndarray, lam: float) -> RidgeFit:
    """Closed-form ridge (intercept unpenalised), in the dual when there are fewer rows than features.

    Features are centred and divided by one common scale (the root mean feature variance), not
    z-scored per feature: an isotropic scale leaves directions as they are, so the fitted direction
    is one in the model's own space (what steering adds), and `lam` is free of the feature units."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    shift, per_feature = standardizer(X)
    common = float(np.sqrt(np.mean(per_feature ** 2))) or 1.0
    scale = np.full(X.shape[1], common)
    Z = (X - shift) / scale
    mean = float(y.mean())
    target = y - mean
    n, d = Z.shape
    if n < d:
        coef = Z.T @ np.linalg.solve(Z @ Z.T + lam * np.eye(n), target)
    else:
        coef = np.linalg.solve(Z.T @ Z + lam * np.eye(d), Z.T @ target)
    return RidgeFit(coef, mean, shift, scale)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot (0 for predicting the mean, negative when worse)."""
    y = np.asarray(y, dtype=np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0.0:
        return float("nan")
    return 1.0 - float(((y - predicted) ** 2).sum()) / total


def projection_std(X: np.ndarray, direction: np.ndarray) -> float:
    """The standard deviation of the rows' projections on a unit direction: the unit of alpha."""
    return float(np.std(np.asarray(X, dtype=np.float64) @ direction))


def random_direction(dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def steer(hidden: torch.Tensor, direction: torch.Tensor, amount: float, positions: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, d) plus `amount` * direction at the positions marked in `positions` (B, L);
    amount 0 returns `hidden` itself, so zero steering is the baseline exactly."""
    if amount == 0.0:
        return hidden
    shift = (amount * direction).to(hidden.dtype).to(hidden.device)
    return hidden + positions.to(hidden.device)[..., None].to(hidden.dtype) * shift


def digit_expectation(logits: torch.Tensor, digit_ids: list[int]) -> torch.Tensor:
    """E[k] for k = 1..len(digit_ids) under the next-token distribution renormalised over the
    digit tokens: sum_k k * softmax(logits[digit_ids])_k. Not a sample."""
    probs = torch.softmax(logits[..., digit_ids].double(), dim=-1)
    values = torch.arange(1, len(digit_ids) + 1, dtype=probs.dtype, device=probs.device)
    return probs @ values
