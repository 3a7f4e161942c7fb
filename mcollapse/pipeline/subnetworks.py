"""Calibrating Wanda masks of the LLM's linear layers on one input side, and applying them.

A side is a list of sequences z put at the placeholder of the model's prompt (the adapter output
for the audio/image side, the transcript's token embeddings for the text side); the input norms are
taken at those placeholder positions only, so both sides see the same template and differ only in
what sits in the slot. Linear layers are found by structure (models.roles.block_linears), their
inputs read with forward pre-hooks; masks are applied by multiplying the weights in place, and the
originals are put back on leaving the context.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mcollapse.analysis.subnetworks import InputNorms, keep_mask, wanda_scores
from mcollapse.extraction.hooks import edited
from mcollapse.models.decoder import compose, pad_sequences
from mcollapse.models.roles import block_linears, decoder_blocks

Key = tuple[int, str]  # (block, module name)


class _Stop(Exception):
    """Leaves a calibration forward after the block that was asked for."""


def linear_layers(model) -> dict[Key, torch.nn.Linear]:
    return {(b, name): module for b, block in enumerate(decoder_blocks(model))
            for name, module in block_linears(block).items()}


def _backbone(decoder, zs: list[torch.Tensor]) -> None:
    batch = compose(decoder.family, [len(z) for z in zs], None, "reference", "sum")
    device, dtype = decoder.device, decoder.family.dtype
    embeds = decoder.embed(batch.input_ids.to(device))
    values = pad_sequences(zs).to(device=device, dtype=dtype)[batch.z_mask.to(device)]
    embeds = embeds.index_put((batch.z_rows.to(device), batch.z_cols.to(device)), values)
    decoder.backbone(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device), use_cache=False)


def input_norms(decoder, zs: list, batch_size: int, blocks: list[int] | None = None,
                stop_after: int | None = None) -> dict[Key, InputNorms]:
    """Sum of x_j^2 over the placeholder positions at the input of every linear layer of `blocks`
    (all by default); with `stop_after`, each forward ends after that block."""
    layers = linear_layers(decoder.model)
    wanted = {k: m for k, m in layers.items() if blocks is None or k[0] in blocks}
    norms = {k: InputNorms(m.in_features) for k, m in wanted.items()}
    state: dict = {}

    def collect(key):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            norms[key].add(x[state["mask"].to(x.device)])
        return hook

    hooks = [(m, "pre", collect(k)) for k, m in wanted.items()]
    if stop_after is not None:
        def stop(*_):
            raise _Stop
        hooks.append((decoder_blocks(decoder.model)[stop_after], "post", stop))
    with edited(hooks), torch.no_grad():
        for start in range(0, len(zs), batch_size):
            part = [torch.as_tensor(z, dtype=torch.float32) for z in zs[start : start + batch_size]]
            state["mask"] = _placeholder_mask(decoder, part)
            try:
                _backbone(decoder, part)
            except _Stop:
                pass
    return norms


def _placeholder_mask(decoder, zs) -> torch.Tensor:
    batch = compose(decoder.family, [len(z) for z in zs], None, "reference", "sum")
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    mask[batch.z_rows, batch.z_cols] = True
    return mask


def masks_from_norms(model, norms: dict[Key, InputNorms], sparsity: float) -> dict[Key, torch.Tensor]:
    layers = linear_layers(model)
    return {k: keep_mask(wanda_scores(layers[k].weight, n.rms()), sparsity) for k, n in norms.items()}


def calibrate(decoder, zs: list, sparsities: list[float], batch_size: int, sequential: bool,
              progress=None) -> dict[float, dict[Key, torch.Tensor]]:
    """Masks per sparsity. Not sequential: one unpruned pass gives every layer's input norms.
    Sequential: block b is calibrated with blocks < b pruned by their own masks of that sparsity
    (one forward per block and sparsity, stopped after block b)."""
    model = decoder.model
    if not sequential:
        norms = input_norms(decoder, zs, batch_size)
        return {s: masks_from_norms(model, norms, s) for s in sparsities}
    n_blocks = len(decoder_blocks(model))
    out = {}
    for s in sparsities:
        masks: dict[Key, torch.Tensor] = {}
        for b in range(n_blocks):
            with pruned(model, masks):
                norms = input_norms(decoder, zs, batch_size, blocks=[b], stop_after=b)
            masks.update(masks_from_norms(model, norms, s))
            if progress:
                progress(1)
        out[s] = masks
    return out


@contextmanager
def pruned(model, masks: dict[Key, torch.Tensor]):
    """The LLM with every masked weight set to zero; the weights are restored on exit."""
    layers = linear_layers(model)
    saved = {}
    try:
        with torch.no_grad():
            for key, mask in masks.items():
                weight = layers[key].weight
                saved[key] = weight.detach().clone()
                weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for key, original in saved.items():
                layers[key].weight.copy_(original)
