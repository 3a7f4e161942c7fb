"""Building a twin's checkpoint once, by name, into the cache.

Checkpoints are built once per builder fingerprint into
``<cache_dir>/models/<name>-<hash>/`` (temp dir + atomic rename, guarded by a
file lock) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.models.twins import shapes
from mcollapse.models.twins.gemma import build_tiny_gemma2, build_tiny_paligemma2
from mcollapse.models.twins.hf import build_tiny_llama, build_tiny_llava, build_tiny_qwen2audio
from mcollapse.models.twins.prismatic import build_tiny_prismatic
from mcollapse.models.twins.tokenization import (
    LLAMA3_CHAT_TEMPLATE,
    PROMPT_CORPUS,
    PROMPT_REPEATS,
    QWEN2AUDIO_CHAT_TEMPLATE,
    TOKENIZER_CORPUS,
    VICUNA_CHAT_TEMPLATE,
)
from mcollapse.models.twins.ultravox import build_tiny_ultravox

TINY_MODELS = ("tiny_qwen2audio", "tiny_llava", "tiny_llama", "tiny_ultravox", "tiny_prismatic",
               "tiny_prismatic_siglip", "tiny_gemma2", "tiny_paligemma2")

# Bump whenever the files a builder writes change in a way the spec below does not capture.
BUILDER_VERSION = "2"

BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny_qwen2audio": build_tiny_qwen2audio,
    "tiny_llava": build_tiny_llava,
    "tiny_llama": build_tiny_llama,
    "tiny_ultravox": build_tiny_ultravox,
    "tiny_prismatic": build_tiny_prismatic,
    "tiny_prismatic_siglip": partial(build_tiny_prismatic, vision_backbone_id="tiny-siglip-vit"),
    "tiny_gemma2": build_tiny_gemma2,
    "tiny_paligemma2": build_tiny_paligemma2,
}

# The modules each twin's files depend on, beyond the shared shapes and tokenizers: a change there rebuilds it.
SHARED_MODULES = ("mcollapse.models.twins.shapes", "mcollapse.models.twins.tokenization")
BUILDER_MODULES = {"tiny_qwen2audio": ("mcollapse.models.twins.hf",),
                   "tiny_llava": ("mcollapse.models.twins.hf",),
                   "tiny_llama": ("mcollapse.models.twins.hf",),
                   "tiny_ultravox": ("mcollapse.models.twins.ultravox", "mcollapse.models.ultravox"),
                   "tiny_prismatic": ("mcollapse.models.twins.prismatic", "mcollapse.models.prismatic",
                                      "mcollapse.models.vit"),
                   "tiny_prismatic_siglip": ("mcollapse.models.twins.prismatic", "mcollapse.models.prismatic",
                                             "mcollapse.models.vit"),
                   "tiny_gemma2": ("mcollapse.models.twins.gemma",),
                   "tiny_paligemma2": ("mcollapse.models.twins.gemma",)}


def builder_fingerprint(name: str) -> str:
    """Short hash naming a checkpoint directory.

    Covers the builder version and everything the written files depend on (the shape
    constants, corpus, templates, and the transformers/torch versions that drive
    serialisation and random init), so a changed builder never reuses a stale checkpoint.
    """
    spec = {
        "builder_version": BUILDER_VERSION,
        "name": name,
        "seed": shapes.WEIGHT_SEED,
        "vocab": shapes.TOKENIZER_VOCAB_SIZE,
        "text": [shapes.TEXT_HIDDEN_SIZE, shapes.TEXT_INTERMEDIATE_SIZE, shapes.TEXT_NUM_LAYERS, shapes.TEXT_NUM_HEADS,
                 shapes.TEXT_NUM_KV_HEADS, shapes.TEXT_MAX_POSITIONS],
        "audio": [SAMPLE_RATE, shapes.AUDIO_NUM_MEL_BINS, shapes.AUDIO_CHUNK_SECONDS, shapes.AUDIO_HOP_LENGTH,
                  shapes.AUDIO_D_MODEL],
        "vision": [shapes.IMAGE_SIZE, shapes.IMAGE_PATCH_SIZE, shapes.VISION_HIDDEN_SIZE],
        "corpus": [PROMPT_CORPUS, PROMPT_REPEATS, TOKENIZER_CORPUS],
        "templates": [QWEN2AUDIO_CHAT_TEMPLATE, VICUNA_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sources": [_source_digest(sys.modules[m].__file__)
                    for m in (__name__, *SHARED_MODULES, *BUILDER_MODULES[name])],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
    return digest[:10]


def _source_digest(path) -> str:
    """A builder's module source: a changed twin architecture or size never reuses an old checkpoint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the one-shard "Writing model shards" bar while building, then restore the setting."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def ensure_tiny_checkpoint(name: str, cache_dir: Path) -> Path:
    """Return the directory of tiny model `name`, building it on first use.

    The directory appears only complete: files are written to a temporary sibling and
    renamed into place, and a file lock keeps concurrent processes from building twice.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    from mcollapse.store.build import build_once

    target = Path(cache_dir) / "models" / f"{name}-{builder_fingerprint(name)}"

    def build(staging: Path) -> None:
        with quiet_progress_bars():
            BUILDERS[name](staging)

    build_once(target, build, Path.is_dir, f"tiny checkpoint {target.name}", cache_dir=cache_dir)
    return target
