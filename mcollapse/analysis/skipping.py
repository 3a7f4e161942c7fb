"""Computation skipping in the LLM: which blocks a rule skips, the FLOPs it saves, and how far greedy
outputs move.

Blocks are numbered 0 .. L-1 (block b maps hidden_states[b] to hidden_states[b + 1]). The interval
rule skips block b when start < b < end and b % interval == 0; `exit` skips every block after
`start`, so the output of block `start` goes straight to the final norm.

FLOPs per position p (0-based, causal context p + 1) and block, from the block's linear layers:
    attention = 2 * sum(in * out over q, k, v, o) + 4 * (p + 1) * d_q   (QK^T and AV)
    mlp       = 2 * sum(in * out over gate, up, down)
`block`/`exit` save both, except the k and v projections of a skipped position when other positions
still attend to it at that block (gating `modality`: the text reads the skipped audio/image keys);
`ffn` saves the MLP; `parallel` saves nothing (it reorders, which only parallel hardware turns into time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPERATIONS = ("block", "ffn", "parallel", "exit")
GATINGS = ("modality", "all", "decode")


def skipped_blocks(n_blocks: int, op: str, start: int, end: int | None, interval: int) -> list[int]:
    """The blocks the rule skips: start < b < end (end null: the depth) and b % interval == 0; for
    `exit`, every block after `start`."""
    if op not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, got {op!r}")
    if op == "exit":
        return list(range(max(start + 1, 0), n_blocks))
    if interval < 1:
        raise ValueError(f"interval must be positive, got {interval}")
    stop = n_blocks if end is None else min(end, n_blocks)
    return [b for b in range(max(start + 1, 0), stop) if b % interval == 0]


@dataclass(frozen=True)
class BlockFlops:
    """Per-position FLOPs of one block, split by what the operations skip."""

    qkvo: dict  # linear FLOPs per projection name (q, k, v, o)
    mlp: float  # gate + up + down
    d_q: int  # width of the queries (the attention core's cost per context position is 4 * d_q)

    def attention(self, context: np.ndarray) -> np.ndarray:
        return sum(self.qkvo.values()) + 4.0 * context * self.d_q

    def full(self, context: np.ndarray) -> np.ndarray:
        return self.attention(context) + self.mlp

    def saved(self, op: str, context: np.ndarray, keys_needed: bool) -> np.ndarray:
        if op == "ffn":
            return np.full(np.shape(context), float(self.mlp))
        if op == "parallel":
            return np.zeros(np.shape(context))
        kv = self.qkvo.get("k", 0.0) + self.qkvo.get("v", 0.0) if keys_needed else 0.0
        return self.full(context) - kv


def block_flops(linear_shapes: dict[str, tuple[int, int]]) -> BlockFlops:
    """From {name: (in_features, out_features)} of q, k, v, o, gate, up, down."""
    qkvo = {n: 2.0 * i * o for n, (i, o) in linear_shapes.items() if n in ("q", "k", "v", "o")}
    mlp = sum(2.0 * i * o for n, (i, o) in linear_shapes.items() if n in ("gate", "up", "down"))
    return BlockFlops(qkvo, mlp, int(linear_shapes["q"][1]))


def skipped_flops(flops: BlockFlops, n_blocks: int, n_skipped: int, op: str, gate: np.ndarray,
                  valid: np.ndarray, keys_needed: bool) -> tuple[float, float]:
    """(FLOPs saved, FLOPs of the unskipped LLM) over rows of positions: `valid` (B, T) marks real
    tokens (right padding excluded), `gate` (B, T) the positions the skipped blocks skip."""
    valid = np.asarray(valid, dtype=bool)
    gate = np.asarray(gate, dtype=bool) & valid
    context = np.cumsum(valid, axis=1)  # causal context of each position, itself included
    total = n_blocks * float(flops.full(context)[valid].sum())
    saved = n_skipped * float(flops.saved(op, context, keys_needed)[gate].sum())
    return saved, total


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far greedy outputs moved: the share of identical sequences, and the token agreement (the
    share of positions that agree, over the longer of each pair, pooled over items)."""
    if len(reference) != len(other):
        raise ValueError("one output per reference")
    if not reference:
        raise ValueError("no outputs to compare")
    exact = np.mean([list(a) == list(b) for a, b in zip(reference, other)])
    agree = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(reference, other))
    length = sum(max(len(a), len(b)) for a, b in zip(reference, other))
    return {"exact_match": float(exact), "token_agreement": float(agree / length) if length else 1.0}
