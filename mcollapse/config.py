"""Typed schemas for the config groups; YAML options under conf/ extend them.

Registered in Hydra's ConfigStore as `<group>/base_<group>` so every option file can start with
`defaults: [base_<group>, _self_]` and get type checking of user overrides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mcollapse import experiment_config
from mcollapse.analysis.modes import RHO_NORMALIZATIONS
from mcollapse.errors import UserError


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
    build: Optional[str] = None  # offline builder name (tiny_*, smol_speech, smol_vision) when no hub checkpoint
    lora: Optional[str] = None  # a saved LoRA adapter dir (experiment=lora writes one), merged at load
    projector: Optional[str] = None  # trained projector weights (a file, a train_adapter run/checkpoint dir,
    # or shipped:<organism>) put over the checkpoint's at load
    small: bool = False  # an offline twin: threads=auto runs it on one thread (see mcollapse.runtime)


@dataclass
class DatasetPart:
    format: str = "???"  # librispeech | cremad | esc50 | coco
    root: str = "???"
    split: Optional[str] = None  # coco only: the split dir under root (default val2017), e.g. train2017


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
    # Other named splits (train, dev) in the same layout; `parts` is the split experiments evaluate on.
    splits: dict[str, Any] = field(default_factory=dict)  # name -> a list of parts, like `parts`


@dataclass
class HookConfig:
    name: str = "default"
    roles: list[str] = field(
        default_factory=lambda: ["encoder_output", "adapter_output", "llm_layer", "llm_final"]
    )
    llm_layer: int = 16
    pooling: str = "all"  # all | modality
    # Every LLM layer in the same forward: null (none), "all", or a list of hidden_states indices
    # 0..L (0: the LLM input, i: the output of block i-1, L: after the final norm), hooks llm_hs_<i>.
    llm_layers: Optional[Any] = None


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


@dataclass
class RunConfig:
    """The top level of config.yaml: typed so `seed=1.5` or `seed=foo` is refused at composition."""

    paths: Any = None
    model: Any = None
    dataset: Any = None
    hook: Any = None
    probe: Any = None
    target: Any = None
    modes: Any = None
    gradients: Any = None
    stats: Any = None
    lora: Any = None  # experiment=lora only
    experiment: Any = None
    report: Optional[experiment_config.ReportSettings] = None  # experiment=report and experiment=verify
    verify: Optional[experiment_config.VerifySettings] = None  # experiment=verify
    cache: Optional[experiment_config.CacheSettings] = None  # experiment=cache
    seed: int = 42
    device: str = "auto"
    strict: bool = False
    threads: Any = "auto"  # auto | null (torch's default) | a count; checked by validate
    flush_every: int = 64


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="paths", name="base_paths", node=PathsConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="hook", name="base_hook", node=HookConfig)
    cs.store(group="probe", name="base_probe", node=ProbeConfig)
    cs.store(group="target", name="base_target", node=TargetConfig)
    cs.store(group="lora", name="base_lora", node=LoraSettings)
    experiment_config.register(cs)


# Experiment fields checked wherever an experiment has them (the schemas guarantee their types).
_EXPERIMENT_COUNTS = ("n_alternatives", "n_boot", "n_random", "n_draws", "histogram_bins", "pca_dims",
                      "max_points", "n_projections", "max_new_tokens", "n_matched", "n_dose", "optimal_steps",
                      "optimal_batch",
                      "max_steps", "eval_every", "checkpoint_every", "patience")  # the last four: train_adapter
_EXPERIMENT_OPTIONAL_COUNTS = ("n_samples", "lipschitz_samples",  # null: every scorable sample
                               "batch_size", "eval_batch_size", "rows_per_forward",
                               "n_train", "n_dev", "n_eval")  # train_adapter, null: the whole split
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be > 0, got {value}")


def _fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"{name} must be in (0, 1), got {value}")


def _device(device: str) -> None:
    if not _DEVICE.match(device):
        raise UserError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device={device} but this torch sees no CUDA GPU; use device=cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")


def _experiment(exp) -> None:
    for key in _EXPERIMENT_COUNTS:
        if key in exp:
            _at_least(f"experiment.{key}", exp[key], 1)
    for key in _EXPERIMENT_OPTIONAL_COUNTS:
        if exp.get(key) is not None:
            _at_least(f"experiment.{key}", exp[key], 1)
    if "n_bootstrap" in exp:  # 0: W1 without intervals
        _at_least("experiment.n_bootstrap", exp.n_bootstrap, 0)
    if "s" in exp:  # GMI's tilt
        _positive("experiment.s", exp.s)
    if "robust_quantile" in exp and not 0 < exp.robust_quantile <= 1:
        raise UserError(f"experiment.robust_quantile must be in (0, 1], got {exp.robust_quantile}")
    for k in exp.get("ms_k") or []:
        _at_least("experiment.ms_k", k, 1)
    if "val" in exp and "test" in exp:  # held-out shares of the groups
        _fraction("experiment.val", exp.val)
        _fraction("experiment.test", exp.test)
        if exp.val + exp.test >= 1:
            raise UserError(f"experiment.val + experiment.test must be < 1, got {exp.val + exp.test:g}")
    if "max_cka_tokens" in exp:  # shift
        _at_least("experiment.max_cka_tokens", exp.max_cka_tokens, 2)
    if "other_perturbation" in exp and exp.other_perturbation < 0:
        raise UserError(f"experiment.other_perturbation must be >= 0, got {exp.other_perturbation}")


def _modes(modes) -> None:
    _at_least("modes.n_modes", modes.n_modes, 1)
    _positive("modes.ms_threshold", modes.ms_threshold)  # a bound on rho = text / modal variance (no upper limit)
    for threshold in modes.thresholds:
        _positive("modes.thresholds", threshold)
    if modes.rho_normalization not in RHO_NORMALIZATIONS:
        raise UserError(f"modes.rho_normalization must be one of {', '.join(RHO_NORMALIZATIONS)}, "
                        f"got {modes.rho_normalization!r}")


def _gradients(gradients) -> None:
    for key in ("n_samples", "batch_size"):  # null: every scorable sample, model.batch_size
        if gradients[key] is not None:
            _at_least(f"gradients.{key}", gradients[key], 1)


def _threads(threads) -> None:
    if threads not in ("auto", None):
        _at_least("threads", threads, 1)


TEXT_SOURCE = "experiment.text.source"
BUILT_MODEL_IGNORES = ("local_path", "hub_id", "revision")


def model_option(name: str, setting: str, conf_dir: Path) -> Path:
    """conf/model/<name>.yaml; an unknown name is refused naming the setting that gave it."""
    path = Path(conf_dir) / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (Path(conf_dir) / "model").glob("*.yaml"))
        choices += ["self", "none"] if setting == TEXT_SOURCE else []
        raise UserError(f"{setting} '{name}' is not a model config ({', '.join(choices)})")
    return path


def _named_models(exp) -> list[tuple[str, str]]:
    """(setting, model config name) of every further model an experiment loads."""
    named = []
    text = exp.get("text")
    if OmegaConf.is_dict(text) and text.source not in ("self", "none"):
        named.append((TEXT_SOURCE, str(text.source)))
    if exp.get("other_model"):
        named.append(("experiment.other_model", str(exp.other_model)))
    for i, spec in enumerate(exp.get("compare") or []):
        if OmegaConf.is_dict(spec) and spec.get("model"):
            named.append((f"experiment.compare[{i}].model", str(spec.model)))
    return named


def _model_names(exp) -> None:
    """Unknown model names fail before any data is read, naming the setting (not text.source)."""
    from mcollapse.cli import config_dir

    for setting, name in _named_models(exp):
        model_option(name, setting, Path(config_dir()))


def _model_settings(model) -> None:
    """Settings a model cannot use are refused: silently ignored, they would label runs falsely."""
    if model.build:  # made on this machine: no hub checkpoint, no local one
        for key in BUILT_MODEL_IGNORES:
            if model[key] is not None:
                raise UserError(f"model.{key} cannot apply to model '{model.name}': it is built offline "
                                f"(model.build={model.build}), so model.{key} would be ignored")
    if model.audio_window_s is not None and model.modality != "audio":
        raise UserError(f"model.audio_window_s cannot apply to model '{model.name}': it takes {model.modality}, "
                        "not audio")
    if model.projector and model.modality == "text":
        raise UserError(f"model.projector cannot apply to model '{model.name}': it is text-only (no projector)")


def _experiment_combinations(cfg) -> None:
    """Experiment settings that only apply beside another one."""
    exp = cfg.experiment
    sae = exp.get("sae")
    if OmegaConf.is_dict(sae) and sae.layer is not None and not sae.path:
        raise UserError("experiment.sae.layer cannot apply without experiment.sae.path (the SAE it locates)")
    if exp.get("other_overrides") and not exp.get("other_model"):
        raise UserError("experiment.other_overrides cannot apply without experiment.other_model (the model they "
                        "change)")
    text = exp.get("text")
    if OmegaConf.is_dict(text) and text.source == "none" and text.format != "prompt" and not exp.get("other_model"):
        raise UserError(f"experiment.text.format={text.format} cannot apply with experiment.text.source=none "
                        "(no text is read)")
    target = cfg.get("target")
    if OmegaConf.is_dict(target) and target.keep_cut_clips and target.name != "content":
        raise UserError(f"target.keep_cut_clips cannot apply to target={target.name}: it scores every clip "
                        "(only target=content skips cut clips)")


def validate(cfg) -> None:
    """Refuse values that cannot work before any data is read or model loaded, one line each
    (a negative probe.C used to fail only after extraction, with a traceback)."""
    _device(str(cfg.device))
    _at_least("flush_every", cfg.flush_every, 1)
    _threads(cfg.threads)
    probe = cfg.probe
    if (probe.C is None) == (probe.weight_decay is None):
        raise UserError("set exactly one of probe.C and probe.weight_decay (probe=reference uses weight_decay)")
    if probe.C is not None:
        _positive("probe.C", probe.C)
    if probe.weight_decay is not None:
        _positive("probe.weight_decay", probe.weight_decay)
    _at_least("probe.max_iter", probe.max_iter, 1)
    _positive("probe.tol", probe.tol)
    _fraction("probe.train_size", probe.train_size)
    if not probe.seeds:
        raise UserError("probe.seeds must not be empty")
    _at_least("probe.min_samples", probe.min_samples, 2)
    if cfg.dataset.max_samples is not None:
        _at_least("dataset.max_samples", cfg.dataset.max_samples, 1)
    _at_least("dataset.lexical_top_k", cfg.dataset.lexical_top_k, 1)
    _at_least("model.batch_size", cfg.model.batch_size, 1)
    if cfg.model.audio_window_s is not None:
        _positive("model.audio_window_s", cfg.model.audio_window_s)
    _modes(cfg.modes)
    _gradients(cfg.gradients)
    _model_settings(cfg.model)
    if OmegaConf.is_dict(cfg.experiment):
        _experiment(cfg.experiment)
        _experiment_combinations(cfg)
        _model_names(cfg.experiment)
