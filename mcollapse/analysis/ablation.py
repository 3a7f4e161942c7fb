"""Subspace ablation: remove chosen modes from the decoder's input and compare its loss, per sample.

A condition names a set of modes u_k (rows of an eigenbasis). Ablating it maps every position
z_t of the adapter-output sequence to

    centred:    z_t - U^T U (z_t - m)      (the variance along the modes; the mean m stays)
    uncentred:  z_t - U^T U z_t            (the earlier code's: the mean's component goes too)

with U (k, d) the modes and m the modal mean the basis was fitted around. Conditions (paper §5.4):
all MS modes; the same number of the highest-variance TA modes; random draws of that many from
all kept modes (several seeds, averaged, with their spread); optionally the top-k MS modes for a
k-sweep. The per-sample loss changes against no ablation are tested with a paired t-test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcollapse.analysis.stats import paired_t

VARIANTS = ("centred", "uncentred")


@dataclass(frozen=True)
class Condition:
    name: str  # ms_all | ta_matched | random | ms_k
    modes: tuple[int, ...]
    seed: int | None = None  # random draws
    k: int | None = None  # ms_k sweep

    @property
    def label(self) -> str:
        if self.seed is not None:
            return f"random_seed{self.seed}"
        if self.k is not None:
            return f"ms_top{self.k}"
        return self.name


def conditions(is_ms: np.ndarray, eigenvalues: np.ndarray, *, n_random: int = 10, seed: int = 0,
               ms_k: list[int] | tuple[int, ...] = ()) -> list[Condition]:
    """The ablation conditions over modes sorted by decreasing eigenvalue.

    ta_matched takes min(#MS, #TA) TA modes of largest variance; random draws #MS modes uniformly
    without replacement from all modes, draw r from its own generator seeded seed + r, so the draw
    labelled random_seed{seed + r} is reproduced by that seed alone."""
    is_ms = np.asarray(is_ms, dtype=bool)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if is_ms.shape != lam.shape:
        raise ValueError(f"is_ms {is_ms.shape} and eigenvalues {lam.shape} differ")
    by_variance = np.argsort(-lam, kind="stable")
    ms = [int(i) for i in by_variance if is_ms[i]]
    ta = [int(i) for i in by_variance if not is_ms[i]]
    out: list[Condition] = []
    if ms:
        out.append(Condition("ms_all", tuple(sorted(ms))))
        if ta:
            out.append(Condition("ta_matched", tuple(sorted(ta[: min(len(ms), len(ta))]))))
        for r in range(n_random):
            drawn = np.random.default_rng(seed + r).choice(lam.size, size=len(ms), replace=False)
            out.append(Condition("random", tuple(sorted(int(i) for i in drawn)), seed=seed + r))
        for k in ms_k:
            if 0 < int(k) <= len(ms):
                out.append(Condition("ms_k", tuple(sorted(ms[: int(k)])), k=int(k)))
    return out


def empty_controls(is_ms: np.ndarray, n_random: int) -> list[str]:
    """Conditions that `conditions` leaves out because their modes do not exist: ta_matched without
    TA modes; everything without MS modes (random draws of #MS = 0 modes remove nothing)."""
    is_ms = np.asarray(is_ms, dtype=bool)
    if not is_ms.any():
        return ["ms_all", "ta_matched"] + (["random"] if n_random > 0 else [])
    return [] if (~is_ms).any() else ["ta_matched"]


def project_out(z: torch.Tensor, modes: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Remove the span of the rows of `modes` (k, d) from every position of z (..., d).

    With `mean`, only the variation around it is removed (centred); without, the raw component."""
    if modes.numel() == 0:
        return z
    anchor = z if mean is None else z - mean
    return z - (anchor @ modes.T) @ modes


def variance_share(eigenvalues: np.ndarray, modes) -> float:
    """Share of the kept modes' variance that a condition removes."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return float(lam[list(modes)].sum() / lam.sum()) if len(modes) else 0.0


def summarise(baseline: np.ndarray, ablated: np.ndarray, *, confidence: float = 0.95) -> dict:
    """Loss change of one condition against no ablation over the same samples: paired t-test,
    CI of the mean change, and the change in % of the mean baseline loss."""
    base = np.asarray(baseline, dtype=np.float64)
    test = paired_t(np.asarray(ablated, dtype=np.float64), base, confidence=confidence)
    mean_base = float(base.mean())
    scale = 100.0 / mean_base if mean_base != 0 else float("nan")
    return {
        "n": test["n"], "mean_loss_baseline": mean_base, "mean_loss": float(np.mean(ablated)),
        "delta_loss": test["mean"], "delta_loss_std": test["std"], "delta_pct": test["mean"] * scale,
        "delta_ci_low": test["ci_low"], "delta_ci_high": test["ci_high"], "delta_pct_ci_low": test["ci_low"] * scale,
        "delta_pct_ci_high": test["ci_high"] * scale, "t": test["t"], "p": test["p"],
    }
