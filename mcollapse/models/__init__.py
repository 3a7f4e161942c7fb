"""Model families and how a model config becomes a loaded model."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from mcollapse.errors import UserError
from mcollapse.models.base import ModelFamily

FAMILIES = {
    "qwen2audio": "mcollapse.models.qwen2audio:Qwen2AudioFamily",
    "llava": "mcollapse.models.llava:LlavaFamily",
    "causal_lm": "mcollapse.models.causal_lm:CausalLMFamily",
    "ultravox": "mcollapse.models.ultravox:UltravoxFamily",
    "prismatic": "mcollapse.models.prismatic:PrismaticFamily",
    "paligemma": "mcollapse.models.paligemma:PaliGemmaFamily",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device '{name}' is not a torch device ({err})") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU (the models' native type, no fp16 overflow) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"model.dtype '{name}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_offline(build: str, cfg, cache_dir: Path) -> Path:
    """Checkpoints made on this machine (no hub): tiny twins and the embedded default."""
    if build == "smol_speech":
        from mcollapse.models.provision import DEFAULT_WINDOW_S, ensure_smol_speech

        return ensure_smol_speech(cache_dir, window_seconds=float(cfg.audio_window_s or DEFAULT_WINDOW_S))
    if build == "smol_vision":
        from mcollapse.models.provision.smol_vision import ensure_smol_vision

        return ensure_smol_vision(cache_dir)
    from mcollapse.models.twins import TINY_MODELS, ensure_tiny_checkpoint

    if build in TINY_MODELS:
        return ensure_tiny_checkpoint(build, cache_dir)
    raise UserError(f"model.build '{build}' is unknown (smol_speech, smol_vision, {', '.join(TINY_MODELS)})")


def checkpoint_source(cfg, cache_dir: Path) -> str:
    if cfg.build:
        return str(build_offline(cfg.build, cfg, cache_dir))
    if cfg.local_path:
        path = Path(cfg.local_path).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"model.local_path {path} is not a checkpoint directory (no config.json)")
        return str(path)
    if not cfg.hub_id:
        raise UserError(f"model '{cfg.name}' names neither hub_id, local_path nor build")
    return cfg.hub_id


def load_model(cfg, cache_dir: Path, device: str = "auto") -> ModelFamily:
    if cfg.family not in FAMILIES:
        raise UserError(f"model.family '{cfg.family}' is unknown ({', '.join(FAMILIES)})")
    module_name, class_name = FAMILIES[cfg.family].split(":")
    family_cls = getattr(importlib.import_module(module_name), class_name)
    torch_device = resolve_device(device)
    source = checkpoint_source(cfg, Path(cache_dir))
    try:
        return family_cls(cfg, source, torch_device, resolve_dtype(cfg.dtype, torch_device))
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not load model '{cfg.name}' from {source} (revision {cfg.revision}): {first}. "
            "Without hub access, download it elsewhere and set model.local_path=<dir>."
        ) from None
