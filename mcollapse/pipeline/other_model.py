"""A second model's activations on the same selected samples: its text side, and its modal side
when it takes the same modality (experiments that compare two models sharing an LLM width)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf, open_dict

from mcollapse.extraction.extract import Extraction, extract_modal, extract_text
from mcollapse.models import load_model
from mcollapse.pipeline.inputs import Selection, text_model_config, text_on_modal_samples
from mcollapse.report.output import RunRecorder
from mcollapse.runtime import release_memory


def other_model_config(name: str, overrides: dict | None):
    """The model config `name` (conf/model/<name>.yaml) with `overrides` merged (e.g. lora=<dir>)."""
    from mcollapse.cli import config_dir

    model_cfg = text_model_config(name, Path(config_dir()), "experiment.other_model")
    if overrides:
        with open_dict(model_cfg):
            model_cfg = OmegaConf.merge(model_cfg, OmegaConf.create(dict(overrides)))
    return model_cfg


def other_model_inputs(cfg, rec: RunRecorder, selection: Selection, model_cfg, text_format: str,
                       label: str = "other") -> dict[str, Extraction]:
    """{"text": ..., "modal": ...} of `model_cfg` on the selection (modal only for a model of the
    run's modality), from the store where it has them; text rows kept to the samples with modal rows."""
    cache_dir = Path(cfg.paths.cache_dir)
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    with rec.stage(f"load_{label}_model"):
        family = load_model(model_cfg, cache_dir, cfg.device)
    out = {}
    if family.modality != "text" and family.modality == cfg.model.modality:
        with rec.stage(f"extract_{label}_modal"):
            out["modal"] = extract_modal(family, selection.records, dataset, cfg.hook, cache_dir, cfg.strict,
                                         cfg.flush_every)
    with rec.stage(f"extract_{label}_text"):
        out["text"] = extract_text(family, selection.records, dataset, cfg.hook, cache_dir, fmt=text_format,
                                   flush_every=cfg.flush_every)
    if "modal" in out:
        out["text"], _ = text_on_modal_samples(out["modal"], out["text"])
    rec.counts[f"{label}_model"] = {"name": model_cfg.name, "modality": family.modality,
                                    "n_text": len(out["text"].activations.ids),
                                    "n_modal": len(out["modal"].activations.ids) if "modal" in out else 0}
    del family
    release_memory()
    return out
