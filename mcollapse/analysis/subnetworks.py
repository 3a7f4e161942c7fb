"""Wanda-style subnetworks: which weights of a linear layer an input distribution relies on.

For a linear layer y = W x (W: out x in) and calibration inputs x, the score of weight (i, j) is

    S_ij = |W_ij| * sqrt(mean over calibration tokens of x_j^2)

and a sparsity s keeps, in every output row i, the round((1 - s) * in) weights of largest score
(ties broken by the lower column index). Two masks A, B of one layer are compared by their
intersection over union |A & B| / |A | B|. Two masks that keep k of n weights per row at random,
independently, share k^2 / n per row in expectation, so their IoU is about (1 - s) / (1 + s).
"""

from __future__ import annotations

import numpy as np
import torch


class InputNorms:
    """Running sum of x_j^2 and the token count for one linear layer's input."""

    def __init__(self, width: int):
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (tokens, width)."""
        x = x.detach().to(torch.float64).cpu()
        self.sum_sq += (x * x).sum(dim=0)
        self.count += x.shape[0]

    def rms(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration token reached this layer")
        return (self.sum_sq / self.count).sqrt()


def wanda_scores(weight: torch.Tensor, input_rms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(mean x_j^2), (out, in)."""
    if weight.shape[1] != input_rms.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} and input norms {tuple(input_rms.shape)} differ in width")
    return weight.detach().abs().to(torch.float64).cpu() * input_rms.to(torch.float64)[None, :]


def n_kept(width: int, sparsity: float) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return max(1, int(round((1.0 - sparsity) * width)))


def keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean (out, in): the top (1 - s) of each row by score, ties to the lower column index."""
    k = n_kept(scores.shape[1], sparsity)
    order = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask


def overlap_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(|A & B|, |A | B|) of two boolean masks."""
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    return int((a & b).sum()), int((a | b).sum())


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, union = overlap_counts(a, b)
    return inter / union if union else 1.0


def random_iou(sparsity: float) -> float:
    """The IoU two independent random masks of sparsity s have in expectation (large layers)."""
    return (1.0 - sparsity) / (1.0 + sparsity)


def summarise_iou(table: dict[tuple[int, str], tuple[int, int]]) -> dict:
    """From {(block, module): (intersection, union)}: IoU per layer (counts pooled over its modules),
    per module type (mean over blocks), and the mean over every (block, module)."""
    per = {key: (i / u if u else 1.0) for key, (i, u) in table.items()}
    blocks = sorted({b for b, _ in table})
    modules = list(dict.fromkeys(m for _, m in table))
    per_layer = {}
    for b in blocks:
        inter = sum(i for (bb, _), (i, _) in table.items() if bb == b)
        union = sum(u for (bb, _), (_, u) in table.items() if bb == b)
        per_layer[b] = inter / union if union else 1.0
    per_module = {m: float(np.mean([v for (_, mm), v in per.items() if mm == m])) for m in modules}
    return {"per_pair": per, "per_layer": per_layer, "per_module": per_module,
            "mean": float(np.mean(list(per.values()))) if per else float("nan")}
