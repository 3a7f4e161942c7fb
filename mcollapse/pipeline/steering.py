"""The model's rating of its media on a 1-5 scale, optionally with a direction added at one layer:
the expectation over the digit tokens of the next-token distribution after a rating prompt."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from mcollapse.analysis.attribute import digit_expectation, steer
from mcollapse.errors import UserError
from mcollapse.extraction.hooks import replaced_at
from mcollapse.models.roles import HookTarget

DIGITS = ("1", "2", "3", "4", "5")
POSITIONS = ("modal", "all")


@dataclass
class Steering:
    """Add `amount` * `direction` (unit) at `target` on the modal positions or on all positions."""

    target: HookTarget
    direction: np.ndarray
    amount: float
    positions: str = "modal"


def digit_token_ids(family) -> list[int]:
    ids = []
    for digit in DIGITS:
        encoded = family.tokenizer(digit, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise UserError(f"model '{family.cfg.name}' has no single token for the digit {digit!r}")
        ids.append(int(encoded[0]))
    return ids


@contextmanager
def prompted(family, prompt: str):
    """The family's configured prompt replaced by `prompt` for the block."""
    before = family.cfg.prompt
    family.cfg.prompt = prompt
    try:
        yield
    finally:
        family.cfg.prompt = before


def ratings(family, samples: list, prompt: str, steering: Steering | None = None) -> np.ndarray:
    """E[rating] per sample (1..5) under the rating prompt, with the steering edit when given."""
    if steering is not None and steering.positions not in POSITIONS:
        raise UserError(f"steer_positions '{steering.positions}' is not one of {', '.join(POSITIONS)}")
    digit_ids = digit_token_ids(family)
    out = []
    size = int(family.cfg.batch_size)
    for start in range(0, len(samples), size):
        with prompted(family, prompt):
            batch = family.prepare(samples[start:start + size])
        batch = batch.to(family.device, family.dtype)
        last = batch.token_mask.long().sum(dim=1) - 1  # right padding: the last real position
        edit = nullcontext()
        if steering is not None:
            mask = batch.modal_token_mask if steering.positions == "modal" else batch.token_mask
            direction = torch.as_tensor(steering.direction, dtype=torch.float32)
            edit = replaced_at(family.model, steering.target,
                               lambda h, m=mask, d=direction: steer(h, d, steering.amount, m))
        with edit, torch.no_grad():
            logits = family.model(**batch.inputs, use_cache=False).logits
        rows = logits[torch.arange(len(last), device=logits.device), last.to(logits.device)]
        out.append(digit_expectation(rows.float().cpu(), digit_ids).numpy())
    return np.concatenate(out)
