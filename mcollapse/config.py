"""Typed schemas for the config groups; YAML options under conf/ extend them.

Registered in Hydra's ConfigStore as `<group>/base_<group>` so every option file can start with
`defaults: [base_<group>, _self_]` and get type checking of user overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PathsConfig:
    name: str = "default"
    data_root: str = "???"
    cache_dir: str = "???"


@dataclass
class ModelConfig:
    name: str = "???"
    family: str = "???"  # module under mcollapse.models
    modality: str = "???"  # audio | image | text
    hub_id: Optional[str] = None
    revision: Optional[str] = None  # pinned hub commit
    local_path: Optional[str] = None  # a local checkpoint dir replaces the hub id
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    prompt: str = ""
    system_prompt: Optional[str] = None
    batch_size: int = 8
    audio_window_s: Optional[float] = None  # encoder window; longer clips are truncated and counted
    hook_paths: dict[str, Optional[str]] = field(  # role -> explicit module path (None: by structure)
        default_factory=lambda: dict.fromkeys(["encoder_output", "adapter_output", "llm_layer", "llm_final"])
    )
    build: Optional[str] = None  # offline builder name (tiny_*, smol_speech) when no hub checkpoint
    lora: Optional[str] = None  # a saved LoRA adapter dir (experiment=lora writes one), merged at load


@dataclass
class DatasetPart:
    format: str = "???"  # librispeech | cremad | esc50 | coco
    root: str = "???"


@dataclass
class DatasetConfig:
    name: str = "???"
    modality: str = "???"
    parts: list[DatasetPart] = field(default_factory=list)
    info_types: list[str] = field(default_factory=list)
    max_samples: Optional[int] = None
    stratify_by: Optional[str] = None
    lexical_rule: str = "reference"  # reference | sentence
    text_normalization: str = "none"  # none | sentence (sentence case, for upper-case transcripts)
    lexical_top_k: int = 50
    generate: Optional[str] = None  # synthetic generator run on first use when parts are missing
    generate_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class HookConfig:
    name: str = "default"
    roles: list[str] = field(
        default_factory=lambda: ["encoder_output", "adapter_output", "llm_layer", "llm_final"]
    )
    llm_layer: int = 16
    pooling: str = "all"  # all | modality


@dataclass
class ProbeConfig:
    name: str = "default"
    C: Optional[float] = 1.0  # None: reference rule C = 1 / (weight_decay * n_train)
    weight_decay: Optional[float] = None
    max_iter: int = 1000
    tol: float = 1e-6
    train_size: float = 0.8
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44, 45, 46])
    min_samples: int = 20


@dataclass
class TargetConfig:
    name: str = "content"  # content | reference (see mcollapse.models.decoder)
    reduction: str = "sum"  # sum | mean over the scored tokens
    keep_cut_clips: bool = False  # content only: also score clips the audio window cut (against the full text)


@dataclass
class LoraSettings:
    name: str = "paper"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    last_layers: Optional[int] = None  # adapt only the LLM's last N layers (null: all)
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 5
    patience: int = 2  # epochs without a lower validation loss before stopping
    batch_size: int = 1
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True  # applied on GPU only, where memory is the limit


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="paths", name="base_paths", node=PathsConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="hook", name="base_hook", node=HookConfig)
    cs.store(group="probe", name="base_probe", node=ProbeConfig)
    cs.store(group="target", name="base_target", node=TargetConfig)
    cs.store(group="lora", name="base_lora", node=LoraSettings)
