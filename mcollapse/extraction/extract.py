"""Fill the activation cache: one forward per batch captures every hook, pooled with masks.

Modal input (audio/image in the paper's prompt) and text input (transcripts or captions through
an LLM) go through the same loop; each is one cache entry, resumed where an interrupted run
stopped, shared by every experiment and sweep job that asks for the same key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch

from mcollapse.data import load_media
from mcollapse.data.base import Record
from mcollapse.errors import MediaError, UserError
from mcollapse.extraction.cache import Activations, ActivationStore
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.pooling import masked_mean
from mcollapse.models.base import LLM_ROLES, Batch, ModelFamily
from mcollapse.models.roles import HookTarget, resolve_hidden_states, resolve_hooks
from mcollapse.progress import progress_bar
from mcollapse.store import ids_digest, texts_digest

log = logging.getLogger(__name__)

POOLINGS = ("all", "modality")


@dataclass
class Extraction:
    activations: Activations
    targets: list[HookTarget]
    key: str
    computed: int = 0  # rows computed in this run (0: served from cache)
    skipped: dict[str, str] = field(default_factory=dict)


def model_identity(family: ModelFamily) -> dict:
    """What makes a model's activations what they are; a merged LoRA adds its weights' hash."""
    cfg = family.cfg
    identity = {
        "model": cfg.name,
        "source": cfg.build or cfg.local_path or cfg.hub_id,
        "checkpoint": Path(family.checkpoint).name if cfg.build else None,  # builder hash, not location
        "revision": getattr(family.model.config, "_commit_hash", None) or family.revision,
        "dtype": str(family.dtype),
    }
    if getattr(cfg, "projector", None):
        from mcollapse.models.projector import projector_digest

        identity["projector"] = projector_digest(cfg.projector)
    if getattr(cfg, "lora", None):
        from mcollapse.models.lora import adapter_digest

        identity["lora"] = adapter_digest(cfg.lora)
    return identity


def _mask_for(target: HookTarget, batch: Batch, pooling: str, hidden: torch.Tensor) -> torch.Tensor:
    """Encoder/adapter positions are all modal (valid frames only); LLM positions are pooled over
    the whole valid sequence (`all`) or the audio/image (or text) positions (`modality`)."""
    if target.role in LLM_ROLES:
        return batch.token_mask if pooling == "all" else batch.modal_token_mask
    width = hidden.shape[1]
    lengths = batch.frame_lengths
    if target.role == "encoder_output" and batch.encoder_frame_lengths is not None:
        lengths = batch.encoder_frame_lengths
    if lengths is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool)
    return torch.arange(width)[None, :] < lengths[:, None]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _store_batch(family, store, targets, batch: Batch, pooling: str, skip_unpoolable=None) -> int:
    """Pool one forward's hooks and store the rows; returns how many. A sample with no position to
    pool at some hook (a clip shorter than one encoder frame) goes to `skip_unpoolable(id, reason)`
    when given, and is otherwise an error."""
    inputs = dict(batch.to(family.device, family.dtype).inputs)
    hidden = capture(family.model, targets, lambda: family.model(**inputs, use_cache=False))
    masks = {t.name: _mask_for(t, batch, pooling, hidden[t.name]) for t in targets}
    keep = torch.ones(len(batch.ids), dtype=torch.bool)
    if skip_unpoolable is not None:
        for target in targets:
            empty = ~masks[target.name].bool().any(dim=1).cpu()
            for row in torch.nonzero(empty & keep).flatten().tolist():
                skip_unpoolable(batch.ids[row], f"too short: no {target.role} frame to pool over")
            keep &= ~empty
    if not keep.any():
        return 0
    rows = torch.nonzero(keep).flatten()
    vectors = {}
    for target in targets:
        tensor, mask = hidden[target.name][rows.to(hidden[target.name].device)], masks[target.name][rows]
        vectors[target.name] = masked_mean(tensor, mask.to(tensor.device)).cpu().numpy()
    try:
        store.add([batch.ids[i] for i in rows.tolist()], vectors)
    except ValueError as err:
        if "non-finite" in str(err):
            raise UserError(str(err)) from None
        raise
    return len(rows)


def _run(family, records, targets, key_fields, cache_dir, batch_size, flush_every, make_batch, label,
         size_of=None, skip_unpoolable=None) -> Extraction:
    """Compute the pending rows of one cache entry in batches of similar size (less padding).

    The order is a pure function of the pending set, so a resumed run forms the same batches."""
    store = ActivationStore(cache_dir, key_fields, [r.id for r in records], flush_every=flush_every)
    served = store.read_if_sound()  # a complete entry is read without taking the write lock
    if served is not None:
        log.info("%s: served from cache %s", label, store.key)
        return Extraction(served, targets, store.key, 0, dict(served.skipped))
    computed = 0
    with store.lock():
        if not store.is_complete():
            pending = set(store.pending_ids())
            todo = [r for r in records if r.id in pending]
            if size_of is not None:
                todo.sort(key=size_of)
            if len(todo) < len(records):
                log.info("%s: resuming, %d of %d samples already cached", label, len(records) - len(todo), len(records))
            with progress_bar(f"extract {label}", total=len(todo)) as advance:
                for chunk in _batches(todo, batch_size):
                    batch = make_batch(chunk, store)
                    if batch is not None:
                        computed += _store_batch(family, store, targets, batch, key_fields["pooling"],
                                                 skip_unpoolable and (lambda i, why: skip_unpoolable(store, i, why)))
                    advance(len(chunk))
            store.finalize()
        else:
            log.info("%s: served from cache %s", label, store.key)
    activations = store.read()
    return Extraction(activations, targets, store.key, computed, dict(activations.skipped))


def readable_samples(records: list[Record], strict: bool, record_skip, problem=None) -> list:
    """Load each record's media; an unreadable one (or one `problem(sample)` names a reason for,
    such as audio a model will not cut) is fatal when strict, else skipped and passed to
    `record_skip(id, reason)` so it is counted in the results."""
    samples = []
    for record in records:
        try:
            sample = load_media(record, strict)
            reason = problem(sample) if problem is not None else None
            if reason:
                raise MediaError(reason)
            samples.append(sample)
        except MediaError as err:
            if strict:
                raise UserError(f"sample {record.id} ({record.path}): {err}") from None
            log.warning("skipping %s: %s", record.id, err)
            record_skip(record.id, str(err))
    return samples


def warn_identical_vectors(extraction: Extraction) -> None:
    """A hook that gives every sample the same vector has nothing to probe (silent or identical
    inputs, a dead layer); say so rather than let probes report chance as a measurement."""
    for hook, vectors in extraction.activations.vectors.items():
        if len(vectors) >= 2 and np.array_equal(vectors.min(axis=0), vectors.max(axis=0)):
            log.warning("all %d vectors of hook %s are identical: its probes measure nothing", len(vectors), hook)


def audio_seconds(record: Record) -> float:
    """A clip's duration from its file header (0 when unreadable: loading will report it)."""
    try:
        return float(soundfile.info(str(record.path)).duration)
    except (RuntimeError, OSError):
        return 0.0


def longer_than(records: list[Record], seconds: float | None) -> list[str]:
    """Ids of the clips the encoder window cuts short, read from file headers (also on a cache hit)."""
    if not seconds:
        return []
    return [r.id for r in records if audio_seconds(r) > seconds + 1e-6]


def hook_targets(family: ModelFamily, hook_cfg, roles=None) -> list[HookTarget]:
    wanted = [r for r in (roles or hook_cfg.roles) if r in family.roles]
    targets = resolve_hooks(
        family.model, wanted, int(hook_cfg.llm_layer), dict(family.cfg.hook_paths or {}),
        family.adapter_module_names(),
    )
    layers = getattr(hook_cfg, "llm_layers", None)
    if layers is not None:  # every requested layer, in the same forward; absent: the keys stay as they were
        targets += resolve_hidden_states(family.model, layers)
    return targets


def text_roles(hook_cfg) -> list[str]:
    return [r for r in hook_cfg.roles if r in LLM_ROLES]


def resolved_model(family: ModelFamily, hook_cfg) -> dict:
    """Everything the activation keys take from a loaded model, as plain JSON.

    Recorded once a model is loaded, so a later run with the same configuration can build the
    same keys and find its activations in the store without loading the model again."""
    return {
        "identity": model_identity(family),
        "modal_targets": [dataclasses.asdict(t) for t in hook_targets(family, hook_cfg)],
        "text_targets": [dataclasses.asdict(t) for t in hook_targets(family, hook_cfg, roles=text_roles(hook_cfg))],
        "prompt": family.render_prompt() if family.modality != "text" else None,  # a text-only LLM has none
        "modality": family.modality,
        "window": family.cfg.audio_window_s,
        "checkpoint": family.checkpoint,
        "cuts_long_audio": bool(family.cuts_long_audio),
    }


def targets_of(resolved: dict, side: str) -> list[HookTarget]:
    """The hook targets of the modal or text side of a resolved model."""
    return [HookTarget(**t) for t in resolved[f"{side}_targets"]]


def modal_key(resolved: dict, dataset: dict, records: list[Record], hook_cfg) -> dict:
    """The key fields of a modal activation entry: built from a resolved model, not a loaded one,
    so the store can be asked before any model is loaded."""
    return {
        **resolved["identity"], "input": "modal", "dataset": dataset, "n": len(records),
        "ids": ids_digest([r.id for r in records]),
        "hooks": [[t.name, t.path, t.capture] for t in targets_of(resolved, "modal")],
        "pooling": hook_cfg.pooling, "prompt": resolved["prompt"], "window": resolved["window"],
    }


def text_key(resolved: dict, dataset: dict, records: list[Record], hook_cfg, fmt: str) -> dict:
    """The key fields of a text activation entry (see `modal_key`)."""
    prompt = resolved["prompt"] if fmt == "prompt" and resolved["modality"] != "text" else None
    return {
        **resolved["identity"], "input": f"text:{fmt}", "dataset": dataset, "n": len(records),
        "ids": ids_digest([r.id for r in records]), "texts": texts_digest(r.text for r in records),
        "hooks": [[t.name, t.path, t.capture] for t in targets_of(resolved, "text")],
        "pooling": hook_cfg.pooling, "prompt": prompt,
    }


def extract_modal(family: ModelFamily, records: list[Record], dataset: dict, hook_cfg, cache_dir,
                  strict: bool = False, flush_every: int = 64) -> Extraction:
    """Audio/image samples in the model's prompt; unreadable media are skipped and counted.

    `dataset` names the dataset and carries its fingerprint, so a regenerated or changed set never
    reuses stale rows under the same sample ids."""
    if hook_cfg.pooling not in POOLINGS:
        raise UserError(f"hook.pooling '{hook_cfg.pooling}' is not one of {', '.join(POOLINGS)}")
    resolved = resolved_model(family, hook_cfg)
    targets = targets_of(resolved, "modal")
    key = modal_key(resolved, dataset, records, hook_cfg)

    def make_batch(chunk, store):
        samples = readable_samples(chunk, strict, store.add_skipped, family.sample_problem)
        return family.prepare(samples) if samples else None

    paths = {r.id: r.path for r in records}

    def skip_unpoolable(store, sample_id, reason):
        reason = f"{paths[sample_id].name}: {reason}"
        if strict:
            raise UserError(f"sample {sample_id} ({paths[sample_id]}): {reason}")
        log.warning("skipping %s: %s", sample_id, reason)
        store.add_skipped(sample_id, reason)

    size_of = audio_seconds if family.modality == "audio" else None
    extraction = _run(family, records, targets, key, cache_dir, int(family.cfg.batch_size), flush_every,
                      make_batch, f"{family.cfg.name}/{dataset['name']}", size_of, skip_unpoolable)
    return checked_modal(extraction, strict)


def checked_modal(extraction: Extraction, strict: bool) -> Extraction:
    """Warn about hooks with nothing to probe; under `strict`, refuse an entry with skipped samples
    (also when the skips were recorded by an earlier, lenient run, or it is served without a model)."""
    warn_identical_vectors(extraction)
    if strict and extraction.skipped:
        first, reason = next(iter(extraction.skipped.items()))
        raise UserError(f"{len(extraction.skipped)} unreadable sample(s), first {first}: {reason}")
    return extraction


def extract_text(family: ModelFamily, records: list[Record], dataset: dict, hook_cfg, cache_dir,
                 fmt: str = "prompt", flush_every: int = 64) -> Extraction:
    """Transcripts/captions through an LLM (the model's own, or a text baseline); LLM hooks only."""
    resolved = resolved_model(family, hook_cfg)
    targets = targets_of(resolved, "text")
    if not targets:
        raise UserError("text extraction needs an LLM hook (llm_layer or llm_final) in hook.roles")
    key = text_key(resolved, dataset, records, hook_cfg, fmt)

    def make_batch(chunk, store):
        usable = []
        for record in chunk:
            if record.text and record.text.strip():
                usable.append(record)
            else:
                store.add_skipped(record.id, "no text")
        if not usable:
            return None
        return family.prepare_text([r.id for r in usable], [r.text for r in usable], fmt=fmt)

    return _run(family, records, targets, key, cache_dir, int(family.cfg.batch_size), flush_every,
                make_batch, f"{family.cfg.name}/{dataset['name']} text", lambda r: len(r.text or ""))
