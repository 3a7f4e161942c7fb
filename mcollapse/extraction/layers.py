"""Per-layer token representations of P (media) and T (text) positions, for the layer-wise lenses.

One forward pass per batch through the multimodal model with the media first and the sample's
caption/transcript after it (`ChatFamily.prepare_with_text`): P tokens are the positions the model
reads the audio/image from, T tokens the text's own positions in the same pass. With
`text_pass="separate"` T comes instead from the text alone through the same LLM
(`prepare_text(fmt="prompt")`); P is the same either way, since the causal LLM's media positions
never see what follows them.

Layers are the LLM's residual stream: index 0 is the input of the first decoder block (the input
embeddings with the media spliced in), index l the output of block l, up to L. Unlike
transformers' `hidden_states`, whose last entry (5.x, Llama/Qwen2) already has the final norm
applied, index L here is block L's raw output: every index is in the same space, and a logit lens
applies the final norm once at every index, the last included.

Per item and layer the entry keeps the masked mean of every P and T position (float32) and up to
`max_tokens` of the positions themselves per side (float16, drawn seeded, kept in order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.extract import model_identity, readable_samples
from mcollapse.extraction.hooks import capture
from mcollapse.models.base import ModelFamily
from mcollapse.models.roles import HookTarget, _path_of, find_text_backbone
from mcollapse.progress import progress_bar
from mcollapse.store import Unreadable, entry, ids_digest, read_npz, texts_digest, write_npz

log = logging.getLogger(__name__)

TEXT_PASSES = ("same", "separate")
FORMAT = 1
SIDES = ("P", "T")


@dataclass
class LayerTokens:
    """Pooled and token-level representations per item and layer, for the P and T sides.

    `pooled[side]` is (N, L+1, d) float32; `tokens[side]` is (sum of kept positions, L+1, d)
    float16 with item n's rows at `offsets[side][n]:offsets[side][n+1]`."""

    ids: list[str]
    pooled: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)
    key: str = ""
    computed: int = 0

    @property
    def n_layers(self) -> int:
        """Number of hidden-state indices (L+1)."""
        return int(self.pooled["P"].shape[1])

    def item_tokens(self, side: str, n: int, layer: int | None = None) -> np.ndarray:
        rows = self.tokens[side][self.offsets[side][n]: self.offsets[side][n + 1]]
        return rows if layer is None else rows[:, layer]

    def token_lists(self, side: str, layer: int) -> list[np.ndarray]:
        return [self.item_tokens(side, n, layer).astype(np.float32) for n in range(len(self.ids))]

    def subset(self, keep: list[int]) -> "LayerTokens":
        tokens, offsets = {}, {}
        for side in SIDES:
            parts = [self.item_tokens(side, n) for n in keep]
            tokens[side] = np.concatenate(parts) if parts else self.tokens[side][:0]
            offsets[side] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return LayerTokens([self.ids[n] for n in keep], {s: self.pooled[s][keep] for s in SIDES}, tokens, offsets,
                           dict(self.skipped), self.key, self.computed)


def layer_targets(family: ModelFamily) -> list[HookTarget]:
    """Index 0: the input of the first decoder block; index l: the output of block l."""
    backbone = find_text_backbone(family.model)
    paths = [_path_of(family.model, block) for block in backbone.layers]
    targets = [HookTarget("llm_layer", "h0", paths[0], "input")]
    targets += [HookTarget("llm_layer", f"h{i + 1}", path, "output") for i, path in enumerate(paths)]
    return targets


def final_norm_and_head(family: ModelFamily) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The LLM's final norm and its LM head (the logit lens applies both, once, to any index)."""
    backbone = find_text_backbone(family.model)
    head = family.model.get_output_embeddings()
    if head is None:
        raise UserError(f"model '{family.cfg.name}' has no LM head to read a logit lens through")
    return backbone.norm, head


def layer_tokens_key(family: ModelFamily, dataset: dict, records: list[Record], text_pass: str,
                     max_tokens: int, seed: int) -> dict:
    return {**model_identity(family), "input": f"media+text:{text_pass}", "dataset": dataset, "n": len(records),
            "ids": ids_digest([r.id for r in records]), "texts": texts_digest(r.text for r in records),
            "prompt": family.render_prompt(), "window": family.cfg.audio_window_s,
            "hooks": "residual 0..L (block inputs/outputs, no final norm)", "max_tokens": max_tokens,
            "seed": seed, "format": FORMAT}


def _keep_positions(mask_row: torch.Tensor, cap: int, rng: np.random.Generator) -> np.ndarray:
    where = torch.nonzero(mask_row).flatten().cpu().numpy()
    if cap and len(where) > cap:
        where = np.sort(rng.choice(where, size=cap, replace=False))
    return where


def _forward_layers(family: ModelFamily, batch, targets) -> torch.Tensor:
    inputs = dict(batch.to(family.device, family.dtype).inputs)
    hidden = capture(family.model, targets, lambda: family.model(**inputs, use_cache=False))
    return torch.stack([hidden[t.name].float() for t in targets], dim=2).cpu()  # (B, S, L+1, d)


def _pool_and_keep(states: torch.Tensor, mask: torch.Tensor, cap: int, rng) -> tuple[list, list]:
    pooled, kept = [], []
    for row in range(states.shape[0]):
        valid = mask[row].bool()
        if not valid.any():
            pooled.append(None)
            kept.append(None)
            continue
        pooled.append(states[row][valid].mean(dim=0).numpy())
        kept.append(states[row][_keep_positions(valid, cap, rng)].numpy().astype(np.float16))
    return pooled, kept


def extract_layer_tokens(family: ModelFamily, records: list[Record], dataset: dict, cache_dir: Path,
                         text_pass: str = "same", max_tokens: int = 32, seed: int = 0, strict: bool = False,
                         batch_size: int | None = None) -> LayerTokens:
    """P and T representations at every layer for `records` (with a text), from the store when there."""
    if text_pass not in TEXT_PASSES:
        raise UserError(f"text_pass '{text_pass}' is not one of {', '.join(TEXT_PASSES)}")
    if family.modality == "text":
        raise UserError(f"model '{family.cfg.name}' is text-only: it has no P positions")
    fields = layer_tokens_key(family, dataset, records, text_pass, max_tokens, seed)
    found = entry(cache_dir, "layer_tokens", fields, suffix=".npz")
    with found.lock():
        served = found.read_or_quarantine(found.path, _read)
        if served is not None:
            served.key = found.key
            log.info("layer tokens served from cache %s", found.key)
            return served
        result = _compute(family, records, text_pass, max_tokens, seed, strict, batch_size or family.cfg.batch_size)
        result.key = found.key
        _write(found.path, result)
    return result


def _compute(family, records, text_pass, max_tokens, seed, strict, batch_size) -> LayerTokens:
    targets = layer_targets(family)
    rng = np.random.default_rng(seed)
    skipped: dict[str, str] = {}
    usable = []
    for record in records:
        if record.text and record.text.strip():
            usable.append(record)
        else:
            skipped[record.id] = "no text"
    ids, pooled, tokens = [], {s: [] for s in SIDES}, {s: [] for s in SIDES}
    with progress_bar(f"layer tokens {family.cfg.name}", total=len(usable)) as advance:
        for start in range(0, len(usable), int(batch_size)):
            chunk = usable[start: start + int(batch_size)]
            samples = readable_samples(chunk, strict, skipped.__setitem__, family.sample_problem)
            advance(len(chunk))
            if not samples:
                continue
            texts = [s.record.text for s in samples]
            batch = family.prepare_with_text(samples, texts)
            p_mask, t_mask = batch.modal_token_mask.clone(), batch.text_token_mask.clone()
            states = _forward_layers(family, batch, targets)
            p_pooled, p_kept = _pool_and_keep(states, p_mask, max_tokens, rng)
            if text_pass == "separate":
                text_batch = family.prepare_text([s.record.id for s in samples], texts, fmt="prompt")
                t_mask = text_batch.modal_token_mask.clone()
                states = _forward_layers(family, text_batch, targets)
            t_pooled, t_kept = _pool_and_keep(states, t_mask, max_tokens, rng)
            for n, sample in enumerate(samples):
                if p_pooled[n] is None or t_pooled[n] is None:
                    skipped[sample.record.id] = "no media or no text position to pool over"
                    continue
                ids.append(sample.record.id)
                pooled["P"].append(p_pooled[n])
                pooled["T"].append(t_pooled[n])
                tokens["P"].append(p_kept[n])
                tokens["T"].append(t_kept[n])
    if not ids:
        first = next(iter(skipped.items()), ("-", "no samples"))
        raise UserError(f"no sample gave layer tokens (e.g. {first[0]}: {first[1]})")
    offsets = {s: np.concatenate([[0], np.cumsum([len(t) for t in tokens[s]])]).astype(np.int64) for s in SIDES}
    return LayerTokens(ids, {s: np.stack(pooled[s]).astype(np.float32) for s in SIDES},
                       {s: np.concatenate(tokens[s]) for s in SIDES}, offsets, skipped, computed=len(ids))


def _write(path: Path, result: LayerTokens) -> None:
    arrays = {"ids": np.array(result.ids), "skipped_ids": np.array(list(result.skipped), dtype=str),
              "skipped_reasons": np.array(list(result.skipped.values()), dtype=str)}
    for side in SIDES:
        arrays[f"pooled_{side}"] = result.pooled[side]
        arrays[f"tokens_{side}"] = result.tokens[side]
        arrays[f"offsets_{side}"] = result.offsets[side]
    write_npz(path, **arrays)


def _read(path: Path) -> LayerTokens:
    """The stored layer tokens; a truncated file, or one whose arrays do not fit together, is `Unreadable`."""
    data = read_npz(path)
    missing = {"ids", "skipped_ids", "skipped_reasons",
               *(f"{array}_{s}" for array in ("pooled", "tokens", "offsets") for s in SIDES)} - set(data)
    if missing:
        raise Unreadable(path, f"lacks {', '.join(sorted(missing))}")
    ids = [str(i) for i in data["ids"]]
    skipped = dict(zip((str(i) for i in data["skipped_ids"]), (str(r) for r in data["skipped_reasons"])))
    pooled = {s: data[f"pooled_{s}"] for s in SIDES}
    tokens = {s: data[f"tokens_{s}"] for s in SIDES}
    offsets = {s: data[f"offsets_{s}"] for s in SIDES}
    if any(len(pooled[s]) != len(ids) or len(offsets[s]) != len(ids) + 1 for s in SIDES):
        raise Unreadable(path, "layer-token arrays do not match their ids")
    return LayerTokens(ids, pooled, tokens, offsets, skipped)
