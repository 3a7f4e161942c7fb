"""Steps for running the same text through two models that share a tokenizer (a base LLM and its
descendant, or one model with and without a LoRA adapter): identical token ids, the hidden state at
the input of the first block and at the output of every block, and a seeded weight perturbation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcollapse.errors import UserError
from mcollapse.extraction.hooks import capture
from mcollapse.models.base import ChatFamily, pad_token_rows
from mcollapse.models.roles import HookTarget, find_text_backbone, resolve_hooks


@dataclass
class SharedTokens:
    ids: list[str]  # the items with a non-empty text
    rows: list[list[int]]  # token ids, BOS first where `bos` is set
    bos: int | None  # the BOS id both models are fed (None: neither tokenizer adds one)
    skipped_empty: list[str]


def _adds_bos(family) -> bool:
    adds = getattr(family, "_adds_bos", None)
    return bool(adds()) if adds is not None else False


def shared_token_rows(a: ChatFamily, b: ChatFamily, ids: list[str], texts: list[str]) -> SharedTokens:
    """Token ids both models read alike, or a one-line UserError naming the first text they differ on.

    The text's own tokens (no special tokens) must be identical in both tokenizers; BOS goes first when
    either model's tokenizer adds one to plain text (Gemma-2 does; PaliGemma's processor turns that off
    and inserts it after the image), and then both must use the same BOS id."""
    tok_a, tok_b = a.tokenizer, b.tokenizer
    use_bos = _adds_bos(a) or _adds_bos(b)
    if use_bos and tok_a.bos_token_id != tok_b.bos_token_id:
        raise UserError(f"shift needs identical token ids, but the BOS ids differ ({tok_a.bos_token_id} vs "
                        f"{tok_b.bos_token_id})")
    bos = tok_a.bos_token_id if use_bos else None
    kept, rows, empty = [], [], []
    for item, text in zip(ids, texts):
        body_a, body_b = a.text_token_ids(text or ""), b.text_token_ids(text or "")
        if body_a != body_b:
            raise UserError(f"shift needs identical token ids, but the two tokenizers split item '{item}' "
                            f"differently ({len(body_a)} vs {len(body_b)} tokens)")
        if not body_a:
            empty.append(item)
            continue
        kept.append(item)
        rows.append(([bos] if bos is not None else []) + body_a)
    return SharedTokens(kept, rows, bos, empty)


def token_batch(ids: list[str], rows: list[list[int]], has_bos: bool, pad_id: int):
    """Right-padded batch; `modal_token_mask` marks the text's own tokens (no BOS, no pads)."""
    marks = [([0] if has_bos else []) + [1] * (len(r) - int(has_bos)) for r in rows]
    return pad_token_rows(ids, rows, marks, pad_id=pad_id)


def block_targets(model: torch.nn.Module) -> list[HookTarget]:
    """hidden_states indices 0..L: 0 the input of the first block (the LLM input), l the output of block l
    (1-based, i.e. of `layers[l-1]`; L is the last block's output, before the final norm)."""
    n_layers = len(find_text_backbone(model).layers)
    first = resolve_hooks(model, ["llm_layer"], 0)[0]
    targets = [HookTarget("llm_layer", "layer_0", first.path, "input")]
    for index in range(n_layers):
        path = resolve_hooks(model, ["llm_layer"], index)[0].path
        targets.append(HookTarget("llm_layer", f"layer_{index + 1}", path, "output"))
    return targets


def hidden_stack(model: torch.nn.Module, targets: list[HookTarget], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """One text-only forward (causal, default positions); the hidden states at `targets`, in order."""
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    hidden = capture(model, targets, lambda: model(**inputs, use_cache=False))
    return [hidden[t.name] for t in targets]


def perturb_llm(model: torch.nn.Module, relative: float, seed: int) -> int:
    """Add seeded Gaussian noise of std `relative` x each tensor's RMS to every floating parameter of the
    text decoder (embeddings, blocks, final norm); returns the number of tensors changed."""
    if relative <= 0:
        return 0
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for param in find_text_backbone(model).parameters():
            if not param.is_floating_point():
                continue
            scale = param.float().pow(2).mean().sqrt().clamp_min(1e-3) * relative
            noise = torch.randn(param.shape, generator=generator) * scale
            param.add_(noise.to(param.device, param.dtype))
            changed += 1
    return changed
