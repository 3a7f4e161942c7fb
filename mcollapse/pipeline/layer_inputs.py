"""The step the layer-wise lenses share (similarity, logit_lens, embedding_map): P and T
representations at every LLM layer for the selected samples, for the run's model or for another
model config (optionally with trained projector weights) named in a comparison list."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from mcollapse.errors import UserError
from mcollapse.extraction.layers import LayerTokens, extract_layer_tokens
from mcollapse.models import load_model
from mcollapse.models.base import ModelFamily
from mcollapse.pipeline.inputs import Selection, text_model_config
from mcollapse.report.output import RunRecorder
from mcollapse.runtime import release_memory

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    name: str  # how results call this model: the run's model name, or the comparison entry's name
    model_cfg: object
    tokens: LayerTokens
    family: ModelFamily | None = None  # kept loaded only when asked (the logit lens reads its head)


def comparison_model(cfg, spec) -> tuple[str, object]:
    """A comparison entry `{name, model, projector}` as (name, model config): `model` a model config
    name (default: the run's model), `projector` trained weights put into it (see model.projector)."""
    from mcollapse.cli import config_dir

    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    unknown = set(spec) - {"name", "model", "projector"}
    if unknown:
        raise UserError(f"experiment.compare entry has unknown fields {sorted(unknown)} (name, model, projector)")
    model_cfg = text_model_config(spec["model"], Path(config_dir()), "experiment.compare entry's model") \
        if spec.get("model") else cfg.model.copy()
    if "projector" in spec:
        with open_dict(model_cfg):
            model_cfg.projector = spec["projector"]
    name = spec.get("name") or spec.get("model") or str(cfg.model.name)
    return str(name), model_cfg


def layer_inputs(cfg, rec: RunRecorder, selection: Selection, model_cfg=None, name: str | None = None,
                 keep_model: bool = False) -> LayerInputs:
    """Load the model, extract (or read from the store) the layer tokens, and free the model unless
    `keep_model`. The stage names carry `name` so a comparison's timings stay apart."""
    model_cfg = cfg.model if model_cfg is None else model_cfg
    name = name or str(model_cfg.name)
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    exp = cfg.experiment
    suffix = "" if name == str(cfg.model.name) and model_cfg is cfg.model else f"_{name}"
    with rec.stage(f"load_model{suffix}"):
        family = load_model(model_cfg, Path(cfg.paths.cache_dir), cfg.device)
    with rec.stage(f"extract_layers{suffix}"):
        tokens = extract_layer_tokens(family, selection.records, dataset, Path(cfg.paths.cache_dir),
                                      text_pass=exp.text_pass, max_tokens=int(exp.max_tokens), seed=int(cfg.seed),
                                      strict=bool(cfg.strict), batch_size=exp.batch_size)
    rec.counts[f"n_items{suffix}"] = len(tokens.ids)
    rec.counts[f"skipped{suffix}"] = len(tokens.skipped)
    rec.counts[f"layer_tokens_computed{suffix}"] = tokens.computed
    rec.extra_meta.setdefault("layer_tokens_entries", {})[name] = tokens.key
    if not keep_model:
        del family
        release_memory()
        family = None
    return LayerInputs(name, model_cfg, tokens, family)
