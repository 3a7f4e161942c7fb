"""Serve cached activations without loading the model that computed them.

An activation key holds what only a loaded model knows (the resolved revision, hook paths found on
its module tree, the rendered prompt). Once a model has been loaded, that resolved identity is
recorded under a key made from the configuration alone; a later run with the same configuration
reads it back, builds the activation keys and, when every entry it needs is complete, never loads
the model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf

from mcollapse.extraction.cache import ActivationStore, is_published
from mcollapse.extraction.extract import Extraction, checked_modal, modal_key, resolved_model, targets_of, text_key
from mcollapse.models import resolve_device, resolve_dtype
from mcollapse.store import entry, write_json
from mcollapse.store.digest import FORMAT_VERSION

log = logging.getLogger(__name__)

_KIND = "resolved_models"
_PINNED = re.compile(r"[0-9a-f]{40}")


def pinned(model_cfg) -> bool:
    """Whether the configuration alone names one set of weights, so a recorded identity stays true.

    A hub revision such as "main" (or none) can move to a new commit at any time: its recorded
    identity would serve activations of a model that is no longer the one named, so such a model
    is always loaded. Trusted are a 40-hex commit sha, a local checkpoint (`local_path`, taken as
    named: rewriting its files in place is the user's change to make under a new path) and the
    checkpoints built offline (tiny twins, smol_speech, smol_vision), whose builder fingerprint is in the key."""
    if model_cfg.build:
        return True
    if model_cfg.local_path:
        return True
    return bool(model_cfg.revision and _PINNED.fullmatch(str(model_cfg.revision)))


def build_fingerprint(model_cfg, cache_dir: Path) -> str | None:
    """The directory name a built checkpoint gets, which changes with its builder; None when the
    builder is unknown here (then nothing is trusted and the model loads, reporting the error)."""
    if model_cfg.build == "smol_speech":
        from mcollapse.models.provision import DEFAULT_WINDOW_S
        from mcollapse.models.provision.smol_speech import smol_speech_dir

        return smol_speech_dir(cache_dir, float(model_cfg.audio_window_s or DEFAULT_WINDOW_S)).name
    if model_cfg.build == "smol_vision":
        from mcollapse.models.provision.smol_vision import smol_vision_dir

        return smol_vision_dir(cache_dir).name
    from mcollapse.models.twins import TINY_MODELS, builder_fingerprint

    if model_cfg.build in TINY_MODELS:
        return f"{model_cfg.build}-{builder_fingerprint(model_cfg.build)}"
    return None


def config_fields(model_cfg, hook_cfg, device: str, cache_dir: Path) -> dict | None:
    """The key of a resolved identity, from the configuration alone; None when it cannot be
    trusted (see `pinned`). Library versions are in it: hook paths and prompts may change with them."""
    if not pinned(model_cfg):
        return None
    fields = {
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "hook": {"roles": list(hook_cfg.roles), "llm_layer": int(hook_cfg.llm_layer)},
        "device": resolve_device(device).type,
        "dtype": str(resolve_dtype(model_cfg.dtype, resolve_device(device))),
        "versions": {"format": FORMAT_VERSION, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    layers = getattr(hook_cfg, "llm_layers", None)
    if layers is not None:  # only when set, so the keys of the default hooks stay as they were
        fields["hook"]["llm_layers"] = layers if isinstance(layers, str) else [int(v) for v in layers]
    if model_cfg.build:
        fields["build"] = build_fingerprint(model_cfg, Path(cache_dir))
        if fields["build"] is None:
            return None
    if model_cfg.projector:
        from mcollapse.models.projector import projector_digest

        fields["projector"] = projector_digest(model_cfg.projector)  # a missing file: a one-line error
    if model_cfg.lora:
        from mcollapse.models.lora import adapter_digest

        try:
            fields["lora"] = adapter_digest(model_cfg.lora)
        except OSError:
            return None  # loading reports the missing adapter
    return fields


def record(cache_dir: Path, fields: dict | None, family, hook_cfg) -> None:
    """Record a loaded model's resolved identity (atomically) for later runs to use without it."""
    if fields is None:
        return
    try:
        write_json(entry(cache_dir, _KIND, fields, suffix=".json").path, resolved_model(family, hook_cfg))
    except OSError as err:  # a read-only shared cache: later runs load the model, as before
        log.info("resolved identity of %s not recorded: %s", family.cfg.name, err)


def recorded(cache_dir: Path, fields: dict | None) -> dict | None:
    """The resolved identity recorded for this configuration, or None (absent or unreadable:
    then the model is loaded and the entry written again)."""
    if fields is None:
        return None
    path = entry(cache_dir, _KIND, fields, suffix=".json").path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _served(cache_dir: Path, key_fields: dict, records, targets) -> Extraction | None:
    """A complete activation entry read without the lock, or None (absent, partial or corrupt)."""
    if not targets or not is_published(cache_dir, key_fields):
        return None
    store = ActivationStore(cache_dir, key_fields, [r.id for r in records])
    served = store.read_if_sound()
    if served is None:
        return None
    return Extraction(served, targets, store.key, 0, dict(served.skipped))


def served_without_model(cfg, records, dataset: dict, text_source: str | None,
                         fields: dict | None) -> tuple[dict, Extraction, Extraction | None] | None:
    """The resolved identity and the modal (and, for text.source=self, text) activations when all
    are in the store; None when anything is missing and the model must be loaded."""
    cache_dir = Path(cfg.paths.cache_dir)
    if text_source not in (None, "none", "self"):
        return None  # a second model's identity is not recorded under this key
    resolved = recorded(cache_dir, fields)
    if resolved is None:
        return None
    modal = _served(cache_dir, modal_key(resolved, dataset, records, cfg.hook), records,
                    targets_of(resolved, "modal"))
    if modal is None:
        return None
    text = None
    if text_source == "self":
        fmt = cfg.experiment.text.format
        text = _served(cache_dir, text_key(resolved, dataset, records, cfg.hook, fmt), records,
                       targets_of(resolved, "text"))
        if text is None:
            return None
    log.info("%s: every activation entry is in the store; the model is not loaded", cfg.model.name)
    return resolved, checked_modal(modal, cfg.strict), text
