"""Typed schemas for the experiment group and the settings experiments share.

Every conf/experiment/<name>.yaml starts with `defaults: [base_<name>, _self_]`, so a wrong type
(`experiment.n_samples=foo`) is refused when the config is composed, and experiments can use the
values as they are. Settings several experiments must agree on live in their own groups, read by
all of them: `modes` (the eigenbasis) and `gradients` (the shared per-sample gradient pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModesConfig:
    """The eigenbasis of the pooled adapter output and its MS/TA split. modes, lipschitz, gradproj,
    gmi, ablation and msswap all read these, so they share one cached basis."""

    name: str = "default"
    n_modes: int = 100  # top modes kept (capped at the data's numerical rank)
    ms_threshold: float = 0.5  # modality-specific: rho < threshold
    rho_normalization: str = "none"  # none (the paper's rho) | trace (rho * tr S_M / tr S_T)
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])  # #MS sensitivity


@dataclass
class StatsConfig:
    """How intervals respect the data's groups: cluster bootstrap over these record fields."""

    name: str = "default"
    cluster_by: list[str] = field(default_factory=lambda: ["speaker_id", "sentence"])
    n_boot: int = 2000


@dataclass
class GradientsConfig:
    """The per-sample gradient pass that lipschitz and gradproj share (and gmi when its
    lipschitz_samples equals n_samples): the same samples, batched alike, give one cached pass."""

    name: str = "default"
    n_samples: Optional[int] = 1000  # usable samples, drawn seeded and stratified by speaker (null: all)
    batch_size: Optional[int] = None  # LLM-only batch; null: model.batch_size


@dataclass
class TextSide:
    source: str = "self"  # self | none | a model config name (llama, vicuna, ...)
    format: str = "prompt"  # prompt | raw


@dataclass
class ExperimentConfig:
    """What every experiment has: its name, which is also the module that runs it."""

    name: str = "???"


@dataclass
class ScoredExperiment(ExperimentConfig):
    """Experiments that score a draw of samples through the LLM, batch by batch."""

    n_samples: Optional[int] = 200  # null: every scorable sample
    batch_size: Optional[int] = None  # null: model.batch_size


@dataclass
class TextSideExperiment(ExperimentConfig):
    """Experiments that also read the texts (transcripts, captions) through an LLM: probe, extract."""

    text: TextSide = field(default_factory=TextSide)


@dataclass
class WassersteinExperiment(TextSideExperiment):
    hook: str = "llm_layer"  # llm_layer | llm_final
    pca_dims: int = 256
    n_bootstrap: int = 200  # 0: W1 without intervals
    max_points: int = 1000
    n_projections: int = 256


@dataclass
class LipschitzExperiment(ExperimentConfig):
    robust_quantile: float = 0.99
    secant_samples: int = 100  # 0: no secant cross-check
    secant_neighbours: int = 2
    histogram_bins: int = 40


@dataclass
class GradprojExperiment(ExperimentConfig):
    statistic: str = "mean"  # mean | rms


@dataclass
class GmiExperiment(ScoredExperiment):
    n_alternatives: int = 15
    estimator: str = "contrastive"  # contrastive | plugin
    s: float = 1.0
    n_boot: int = 2000
    lipschitz_samples: Optional[int] = 200  # the L_log draw; equal to gradients.n_samples shares lipschitz's pass
    bound_lipschitz: str = "p95"  # p95 | mean | max
    probe_label: str = "transcript"


@dataclass
class AblationExperiment(ScoredExperiment):
    """Edits along mode subspaces with references and controls (experiments.ablation)."""

    rows_per_forward: Optional[int] = None  # null: 4 x batch size
    basis: Optional[str] = None  # an eigenbasis.npz to use instead of the shared one
    n_random: int = 10  # count-matched random_k draws
    ms_k: list[int] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: ["resample", "position_mean", "optimal", "centred",
                                                          "uncentred"])
    n_draws: int = 3  # partner draws for resample and swap
    n_matched: int = 8  # dose-matched random subspaces per treatment
    control_variants: list[str] = field(default_factory=lambda: ["resample", "centred"])
    n_dose: int = 24  # random mode subsets tracing the dose-response curve
    dose_variants: list[str] = field(default_factory=lambda: ["resample", "centred"])
    dose: str = "token"  # token | pooled: the variance share matched and plotted
    dose_tolerance: float = 0.02  # relative: a matched control's dose within 2 % of the treatment's
    optimal_steps: int = 100
    optimal_batch: int = 8
    optimal_lr: float = 0.05


@dataclass
class MsswapExperiment(ScoredExperiment):
    group_by: str = "speaker"
    n_draws: int = 3
    basis: Optional[str] = None


@dataclass
class SkipExperiment(ScoredExperiment):
    """Computation skipping in the LLM (experiments.skip); see conf/experiment/skip.yaml."""

    operations: list[str] = field(default_factory=lambda: ["block", "ffn", "parallel", "exit"])
    gating: list[str] = field(default_factory=lambda: ["modality", "all", "decode"])
    start: int = 0
    end: Optional[int] = None
    intervals: list[int] = field(default_factory=lambda: [2])
    parallel_norm: str = "input"  # input | post
    max_new_tokens: int = 32


@dataclass
class WeightOverlapExperiment(ScoredExperiment):
    """Wanda-style modality subnetworks (experiments.weight_overlap)."""

    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5])
    sequential: bool = False
    prune_eval: bool = False


@dataclass
class LoraQuestion:
    what: str = "???"
    question: str = "???"


@dataclass
class LoraExperiment(ExperimentConfig):
    label: str = "emotion"
    objective: str = "task"  # task | text
    group_by: Optional[str] = "speaker"
    val: float = 0.1
    test: float = 0.2
    max_new_tokens: int = 24
    eval_batch_size: Optional[int] = None  # null: model.batch_size
    system: dict[str, str] = field(default_factory=dict)  # modality -> system prompt with {what}
    questions: dict[str, LoraQuestion] = field(default_factory=dict)


@dataclass
class TrainAdapterExperiment(ExperimentConfig):
    """Projector-only training (experiments.train_adapter); see conf/experiment/train_adapter.yaml."""

    train_split: str = "train"  # dataset.splits names; the evaluated held-out split is dataset.parts
    dev_split: str = "dev"
    n_train: Optional[int] = None  # null: the whole split
    n_dev: Optional[int] = 200
    n_eval: Optional[int] = 100
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 800
    min_lr_ratio: float = 0.05
    batch_size: int = 16
    max_grad_norm: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 200
    patience: int = 3  # evaluations without a better dev loss before stopping
    autocast: str = "auto"  # auto (bf16 on CUDA or a CPU with bf16 instructions) | bf16 | none
    max_minutes: Optional[float] = None  # stop (and say so) after this much training time
    max_new_tokens: int = 48
    n_alternatives: int = 15  # the held-out contrastive GMI's m
    eval_batch_size: Optional[int] = None  # null: model.batch_size


@dataclass
class ReportExperiment(ExperimentConfig):
    run_subdir: str = "."  # the output dir under outputs/<name>/: a report is of no one model x dataset


@dataclass
class ReportSettings:
    runs: Any = "???"  # a multirun dir, a run dir, a glob, or a list of them
    inline_rows: int = 15


@dataclass
class VerifySettings:
    expected: str = "paper"
    allow_missing: bool = False


@dataclass
class CacheSettings:
    action: str = "list"  # list | verify | prune
    kind: Optional[str] = None  # only this kind of entry (null: all)
    model: Optional[str] = None  # only entries of this model config (null: all)
    older_than_days: Optional[float] = None  # prune: only entries last written longer ago
    dry_run: bool = True  # prune: list what would be deleted; false deletes it


@dataclass
class ShiftSae:
    path: Optional[str] = None  # a Gemma Scope params.npz (or its directory); null: no SAE comparison
    layer: Optional[int] = None  # the block whose OUTPUT the SAE was trained on, 0-based (Gemma Scope's layer_k)


@dataclass
class ShiftExperiment(ExperimentConfig):
    """Representation shift between the run's model and another reading the same token ids (experiments.shift)."""

    other_model: Optional[str] = None  # a model config name (the base LLM); null: the run's model itself
    other_lora: Optional[str] = None  # a LoRA adapter dir put on the other model (null: none)
    other_perturbation: float = 0.0  # seeded relative noise on the other model's LLM weights (0: none)
    n_samples: Optional[int] = 200  # texts (null: every selected sample with one)
    batch_size: Optional[int] = None  # null: model.batch_size
    max_cka_tokens: int = 4096  # token-level CKA on a seeded subset of this many tokens (the same in both)
    sae: ShiftSae = field(default_factory=ShiftSae)


@dataclass
class LayerLensExperiment(ExperimentConfig):
    """Lenses on P (media) and T (text) representations at every LLM layer (extraction.layers)."""

    text_pass: str = "same"  # same: T in the media + text pass | separate: T from the text alone
    max_tokens: int = 32  # token positions kept per item and side (seeded draw); 0: all
    batch_size: Optional[int] = None  # null: model.batch_size


@dataclass
class SimilarityExperiment(LayerLensExperiment):
    pairings: list[str] = field(default_factory=lambda: ["all", "matched"])
    poolings: list[str] = field(default_factory=lambda: ["pooled", "mean", "median", "max", "min"])
    steps: list[int] = field(default_factory=lambda: [1, 8])  # consecutive layers l vs l+k
    noise: bool = True  # the baseline with P replaced by uniform noise of the same shape and scale
    compare: list[Any] = field(default_factory=list)  # [{name, model, projector}] beside the run's model


@dataclass
class LogitLensExperiment(LayerLensExperiment):
    steps: list[int] = field(default_factory=lambda: [1, 8])
    layers: Optional[list[int]] = None  # top-k tables at these layers (null: 0, L/4, L/2, 3L/4, L)
    top_n: int = 10  # most frequent ids per table


@dataclass
class EmbeddingMapExperiment(LayerLensExperiment):
    methods: list[str] = field(default_factory=lambda: ["pca"])  # pca | tsne
    layers: Optional[list[int]] = None  # null: 0, L/2, L
    perplexity: float = 30.0  # t-SNE (capped below a third of the points)


@dataclass
class TransferExperiment(TextSideExperiment):
    """Probe transfer across (model, input) settings per layer, and the modality probe."""

    labels: list[str] = field(default_factory=lambda: ["lexical", "object_category"])  # those the dataset has
    other_model: Optional[str] = None  # a model config sharing the LLM width (null: the run's model only)
    other_overrides: Dict[str, Any] = field(default_factory=dict)  # merged into other_model's config (e.g. lora: <dir>)
    standardize: str = "own"  # own: each setting z-scored by its own training rows | source: the probe's
    modality_probe: bool = True


@dataclass
class AttributeExperiment(ExperimentConfig):
    """Perceptual-attribute probes over controlled variants of each item, and steering along them."""

    attributes: Optional[list[str]] = None  # null: all of the dataset's modality
    factors: Dict[str, Any] = field(default_factory=dict)  # attribute -> factor list (default: the module's)
    ridge: float = 10.0  # ridge penalty on centred features in units of their mean variance
    train_size: float = 0.8
    steer: bool = True
    steer_layer: int = -4  # hidden_states index whose representation is shifted (negative: from the end)
    steer_positions: str = "modal"  # modal | all
    alphas: list[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 2.0, 4.0])
    steer_samples: int = 8  # base items (test split) the rating is measured on
    n_random: int = 1  # random-direction controls


EXPERIMENTS = {
    "probe": TextSideExperiment, "extract": TextSideExperiment, "wasserstein": WassersteinExperiment,
    "lipschitz": LipschitzExperiment, "gradproj": GradprojExperiment, "gmi": GmiExperiment,
    "modes": ExperimentConfig, "ablation": AblationExperiment, "msswap": MsswapExperiment,
    "lora": LoraExperiment, "train_adapter": TrainAdapterExperiment,
    "report": ReportExperiment, "verify": ReportExperiment, "cache": ReportExperiment,
    "skip": SkipExperiment, "weight_overlap": WeightOverlapExperiment,
    "similarity": SimilarityExperiment, "logit_lens": LogitLensExperiment, "embedding_map": EmbeddingMapExperiment,
    "shift": ShiftExperiment, "transfer": TransferExperiment, "attribute": AttributeExperiment,
}


def register(cs: ConfigStore) -> None:
    for name, schema in EXPERIMENTS.items():
        cs.store(group="experiment", name=f"base_{name}", node=schema, package="experiment")
    cs.store(group="modes", name="base_modes", node=ModesConfig)
    cs.store(group="gradients", name="base_gradients", node=GradientsConfig)
    cs.store(group="stats", name="base_stats", node=StatsConfig)
