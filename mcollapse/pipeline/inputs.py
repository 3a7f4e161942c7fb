"""Steps most experiments share: the dataset selection and the cached modal/text activations."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from mcollapse.config import TEXT_SOURCE, ModelConfig, model_option
from mcollapse.data import load_records, select
from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.cache import Activations
from mcollapse.extraction.extract import Extraction, extract_modal, extract_text, longer_than
from mcollapse.models import load_model
from mcollapse.pipeline import lazy
from mcollapse.report.output import RunRecorder
from mcollapse.runtime import release_memory
from mcollapse.store import ContentDigests, entry

log = logging.getLogger(__name__)


def recorder(cfg, run_dir: Path) -> RunRecorder:
    identity = {"experiment": cfg.experiment.name, "model": cfg.model.name, "dataset": cfg.dataset.name}
    return RunRecorder(run_dir, identity, extra_meta={"config": OmegaConf.to_container(cfg, resolve=True)})


@dataclass
class Selection:
    records: list[Record]
    fingerprint: str  # ids, file sizes and generator options of the whole dataset
    digest: str  # the selected ids and the fingerprint: runs pair up only over the same samples


def selection_digest(ids: list[str], fingerprint: str) -> str:
    return hashlib.sha256("\n".join([fingerprint, *ids]).encode()).hexdigest()[:16]


def selected_records(cfg, rec: RunRecorder) -> Selection:
    with rec.stage("data"):
        memo = entry(cfg.paths.cache_dir, "media_digests", {"dataset": str(cfg.dataset.name)}, suffix=".json")
        records, info = load_records(cfg.dataset, ContentDigests(memo.path))
        chosen = select(records, cfg.dataset.max_samples, cfg.dataset.stratify_by, cfg.seed)
    rec.counts.update({"n_found": len(records), "n_selected": len(chosen),
                       "files_skipped_at_load": info.get("skipped", {})})
    if not chosen:
        raise UserError(f"dataset '{cfg.dataset.name}' has no samples")
    log.info("dataset %s: %d samples found, %d selected", cfg.dataset.name, len(records), len(chosen))
    digest = selection_digest([r.id for r in chosen], info["fingerprint"])
    rec.summary_fields["selection_digest"] = digest
    return Selection(chosen, info["fingerprint"], digest)


def text_model_config(name: str, conf_dir: Path, setting: str = TEXT_SOURCE):
    """A model option file by name, loaded beside the run's model (the text baseline, another model
    to compare); an unknown name is refused naming `setting`, the setting that gave it."""
    loaded = OmegaConf.load(model_option(name, setting, conf_dir))
    loaded.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)


@dataclass
class ExtractedInputs:
    modal: Extraction
    text: Extraction | None


def text_on_modal_samples(modal: Extraction, text: Extraction) -> tuple[Extraction, int]:
    """The text rows of the samples that have a modal row, and how many were dropped.

    A clip whose media could not be read has no modal row but keeps its transcript's text row;
    modal and text probes (and W1 between the clouds) must compare the same samples."""
    has_modal = set(modal.activations.ids)
    acts = text.activations
    rows = [n for n, sample_id in enumerate(acts.ids) if sample_id in has_modal]
    kept = Activations([acts.ids[n] for n in rows], {hook: v[rows] for hook, v in acts.vectors.items()},
                       acts.skipped, acts.key_fields)
    return dataclasses.replace(text, activations=kept), len(acts.ids) - len(rows)


def _extract_with_model(cfg, rec: RunRecorder, records, dataset: dict, text_source, fields):
    """Load the model, record its resolved identity under `fields`, and extract what is missing."""
    from mcollapse.cli import config_dir

    cache_dir = Path(cfg.paths.cache_dir)
    with rec.stage("load_model"):
        family = load_model(cfg.model, cache_dir, cfg.device)
    lazy.record(cache_dir, fields, family, cfg.hook)
    rec.extra_meta["checkpoint"] = family.checkpoint
    cuts_long_audio = family.cuts_long_audio
    with rec.stage("extract_modal"):
        modal = extract_modal(family, records, dataset, cfg.hook, cache_dir, cfg.strict, cfg.flush_every)
    text = None
    if text_source not in (None, "none"):
        if text_source != "self":
            del family
            release_memory()
            with rec.stage("load_text_model"):
                family = load_model(text_model_config(text_source, Path(config_dir())), cache_dir, cfg.device)
        with rec.stage("extract_text"):
            text = extract_text(family, records, dataset, cfg.hook, cache_dir,
                                fmt=cfg.experiment.text.format, flush_every=cfg.flush_every)
    del family
    release_memory()
    return modal, text, cuts_long_audio


def modal_and_text(cfg, rec: RunRecorder, selection: Selection) -> ExtractedInputs:
    """Extract (or read from the cache) the modal activations, then the text side if asked,
    restricted to the samples that have modal rows. The store is asked first: when every entry is
    there the model is not loaded (see `pipeline.lazy`)."""
    cache_dir = Path(cfg.paths.cache_dir)
    records = selection.records
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    text_source = cfg.experiment.text.source if "text" in cfg.experiment else "none"
    fields = lazy.config_fields(cfg.model, cfg.hook, cfg.device, cache_dir)
    cached = lazy.served_without_model(cfg, records, dataset, text_source, fields)
    if cached is not None:
        resolved, modal, text = cached
        rec.extra_meta["checkpoint"] = resolved["checkpoint"]
        cuts_long_audio = resolved["cuts_long_audio"]
    else:
        modal, text, cuts_long_audio = _extract_with_model(cfg, rec, records, dataset, text_source, fields)
    rec.counts["model_loaded"] = cached is None
    rec.counts.update({
        "n_modal": len(modal.activations.ids), "modal_skipped": modal.skipped,
        "n_audio_cut_to_window": len(longer_than(records, cfg.model.audio_window_s)) if cuts_long_audio else 0,
        "modal_rows_computed": modal.computed,
    })
    if text is not None:
        text, dropped = text_on_modal_samples(modal, text)
        rec.counts.update({"n_text": len(text.activations.ids), "text_skipped": len(text.skipped),
                           "text_rows_without_modal_dropped": dropped, "text_source": text_source})
    return ExtractedInputs(modal, text)
