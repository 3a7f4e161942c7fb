"""LoRA on the LLM only, through peft: attach for training, save, and load for any experiment.

A saved adapter is loaded unmerged, as it was trained and evaluated: merging B A into bf16 weights
rounds away every update smaller than half the weights' ulp, so a merged model would not be the
model whose task accuracy was measured.

The towers of multimodal models have their own `q_proj`/`k_proj`/`v_proj` linears (Whisper's
encoder, CLIP's vision model), so target modules are matched by a regex anchored at the text
backbone's module path, and after wrapping every trainable parameter is checked to sit in it:
a LoRA that touched the encoder or adapter would change what the probes compare.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import nn

from mcollapse.errors import UserError
from mcollapse.models.roles import find_text_backbone

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
APPLIED_AS = "unmerged"  # in the adapter digest: caches from models with the adapter merged are not reused


def llm_path(model: nn.Module) -> str:
    """Dotted path of the text decoder stack inside `model` (e.g. `model.language_model`)."""
    backbone = find_text_backbone(model)
    for name, module in model.named_modules():
        if module is backbone:
            return name
    raise UserError("the text backbone is not a submodule of the model")


def target_regex(prefix: str, modules: list[str], layers: list[int] | None = None) -> str:
    """A peft `target_modules` regex: the named linears inside the LLM (in `layers` of its stack
    only, when given) and nowhere else."""
    names = "|".join(re.escape(m) for m in modules)
    head = rf"{re.escape(prefix)}\." if prefix else ""
    if layers is not None:
        head += rf"layers\.({'|'.join(str(i) for i in layers)})\."
    return rf"^{head}(.*\.)?({names})$"


def lora_config(settings, model: nn.Module):
    from peft import LoraConfig

    layers = None
    if settings.last_layers is not None:
        count = len(find_text_backbone(model).layers)
        if not 1 <= int(settings.last_layers) <= count:
            raise UserError(f"lora.last_layers must be 1..{count} (the LLM's layers), got {settings.last_layers}")
        layers = list(range(count - int(settings.last_layers), count))
    return LoraConfig(r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                      target_modules=target_regex(llm_path(model), list(settings.target_modules), layers),
                      bias="none")


def trainable_outside(model: nn.Module, prefix: str) -> list[str]:
    """Trainable parameters that are not inside the LLM (must be none)."""
    inside = f"{prefix}." if prefix else ""
    return [name for name, p in model.named_parameters() if p.requires_grad and not _strip(name).startswith(inside)]


def _strip(name: str) -> str:
    """A parameter name as in the unwrapped model (peft prefixes `base_model.model.`)."""
    return name.removeprefix("base_model.model.")


def attach(model: nn.Module, settings):
    """Wrap `model` with fresh LoRA layers on the LLM's attention projections; returns the peft model.

    The wrapped modules are changed in place, so references to the backbone, the embeddings and the
    LM head taken before stay valid."""
    from peft import get_peft_model

    prefix = llm_path(model)
    try:
        peft_model = get_peft_model(model, lora_config(settings, model))
    except ValueError as err:
        raise UserError(f"lora.target_modules {list(settings.target_modules)} match nothing in the LLM: {err}") \
            from None
    outside = trainable_outside(peft_model, prefix)
    if outside:
        raise RuntimeError(f"LoRA made parameters outside the LLM trainable: {outside[:3]}")
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise RuntimeError("LoRA attached no trainable parameters")
    return peft_model.eval()  # new LoRA dropout layers start in training mode; training switches it on


def with_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """`model` with a saved adapter's LoRA layers injected, unmerged: the same root module and
    module paths (each adapted linear keeps its weight as `base_layer`), so hooks are unchanged.

    An adapter reaching outside the LLM is refused, so encoder and adapter outputs of a LoRA
    model are the base model's (the adapter-sequence cache relies on it)."""
    from peft import PeftModel

    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"model.lora {path} is not a saved LoRA adapter (no adapter_config.json)")
    prefix = llm_path(model)
    try:
        wrapped = PeftModel.from_pretrained(model, str(path))
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.lora {path} does not fit this model: {first}") from None
    adapted = [_strip(name) for name, _ in wrapped.named_modules() if name.endswith(".lora_A")]
    outside = [name for name in adapted if not name.startswith(f"{prefix}.")]
    if not adapted or outside:
        raise UserError(f"model.lora {path} adapts modules outside the LLM ({(outside or ['none'])[0]})")
    return wrapped.get_base_model()  # the LoRA layers stay in place; the wrapper adds nothing to a forward


def adapter_digest(adapter_dir: str | Path) -> str:
    """Content hash of a saved adapter, so cached activations of a LoRA model are keyed by its weights."""
    digest = hashlib.sha256(APPLIED_AS.encode())
    for name in ADAPTER_FILES:
        file = Path(adapter_dir).expanduser() / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
