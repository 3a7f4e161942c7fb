"""Padding-aware pooling of (batch, positions, width) hook outputs into one vector per sample."""

from __future__ import annotations

import torch


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is true, in float32 so padding never leaks in.

    `hidden` is (B, T, d) or already pooled (B, d); `mask` is (B, T). A row with no valid
    position is an error rather than a silent zero vector.
    """
    if hidden.dim() == 2:
        return hidden.float()
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
    weights = mask.to(device=hidden.device, dtype=torch.float32)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a sample has no valid position to pool over")
    summed = torch.einsum("btd,bt->bd", hidden.float(), weights)
    return summed / counts[:, None]
