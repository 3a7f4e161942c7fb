"""Skipping LLM blocks or their sub-blocks at chosen positions, as forward hooks on the decoder blocks.

The blocks and their attention / MLP / norm sub-modules are found by structure (models.roles); no
model class is patched. Per skipped block b with input x and gated positions g:

* ``block`` / ``exit``: a post-hook on the block puts x back at g (output = input);
* ``ffn``: a post-hook on the MLP zeroes its output at g, so the block returns x + attn(ln1 x);
* ``parallel``: a pre-hook on the block keeps x, a pre-hook on the MLP replaces its input at g by
  ln(x) (`parallel_norm`: the block's input norm, ln1, or its own post-attention norm), so the block
  returns x + attn(ln1 x) + mlp(ln(x)).

Attention still runs at every position, so keys and values of a skipped position come from its
input x: the positions that are not skipped attend to them (the FLOP count says so).

Which positions are gated is decided per forward from its width: a `Gate` holds the mask of the
first forward (the prompt, or the teacher-forced rows) and one value for every later one-token
decoding step of a cached greedy run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mcollapse.extraction.hooks import edited
from mcollapse.models.roles import block_parts, decoder_blocks


@dataclass
class Gate:
    first: torch.Tensor  # (B, T0) bool: the gated positions of the full-width forward
    steps: bool  # whether one-token decoding steps are gated

    def mask(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, width = hidden.shape[:2]
        if width == self.first.shape[1]:
            return self.first.to(hidden.device)
        return torch.full((batch, width), self.steps, dtype=torch.bool, device=hidden.device)


def gate_for(gating: str, z_rows: torch.Tensor, z_cols: torch.Tensor, prompt_lengths: list[int],
             width: int) -> Gate:
    """`modality`: the audio/image positions of the prompt; `all`: every position; `decode`: the
    positions after the prompt (teacher-forced answer tokens, or generated ones)."""
    batch = len(prompt_lengths)
    first = torch.zeros((batch, width), dtype=torch.bool)
    if gating == "modality":
        first[z_rows, z_cols] = True
        return Gate(first, False)
    if gating == "all":
        return Gate(first | True, True)
    if gating == "decode":
        positions = torch.arange(width)[None, :]
        return Gate(positions >= torch.tensor(prompt_lengths)[:, None], True)
    raise ValueError(f"gating must be modality, all or decode, got {gating!r}")


def _output_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_output(output, tensor):
    return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])


def _input_tensor(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def skipping(model, blocks: list[int], op: str, gate: Gate, parallel_norm: str = "input"):
    """Within the context, the forward passes of `model`'s LLM skip `blocks` at the gated positions."""
    layers = decoder_blocks(model)
    hooks = []
    for index in blocks:
        block = layers[index]
        if op in ("block", "exit"):
            def restore(_module, args, kwargs, output):
                x = _input_tensor(args, kwargs)
                out = _output_tensor(output)
                return _with_output(output, torch.where(gate.mask(out)[..., None], x, out))

            hooks.append((block, "post", restore))
        elif op == "ffn":
            def drop_mlp(_module, _args, _kwargs, output):
                return output.masked_fill(gate.mask(output)[..., None], 0.0)

            hooks.append((block_parts(block).mlp, "post", drop_mlp))
        elif op == "parallel":
            parts = block_parts(block)
            norm = parts.input_norm if parallel_norm == "input" else parts.post_norm
            kept: dict = {}

            def keep_input(_module, args, kwargs, kept=kept):
                kept["x"] = _input_tensor(args, kwargs)

            def parallel_input(_module, args, kwargs, kept=kept, norm=norm):
                h = _input_tensor(args, kwargs)
                new = torch.where(gate.mask(h)[..., None], norm(kept["x"]), h)
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            hooks += [(block, "pre", keep_input), (parts.mlp, "pre", parallel_input)]
        else:
            raise ValueError(f"unknown skip operation {op!r}")
    with edited(hooks):
        yield
