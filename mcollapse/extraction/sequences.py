"""Per-sample adapter-output sequences, cached so LLM-side experiments never re-run the encoder.

Gradients, GMI scores, ablations and swaps all feed the LLM the adapter output z (T_i x d, valid
frames only). It is computed once per sample by a forward that stops as soon as the adapter has
fired (the LLM never runs) and kept as one `.npy` file per sample, published by rename: a crash
leaves only complete files, and any sample selection of the same model x dataset reuses what is
there. Jobs compute under the entry's lock, so concurrent jobs needing the same samples run the
encoder on each once: the others wait, then read.

Layout: ``<cache_dir>/sequences/<key>/entry.json`` (key fields), ``.lock``, and ``<sha>.npy`` per
sample, or ``<sha>.skip.json`` for a sample whose media could not be read.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcollapse import store as cache_store
from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.extract import audio_seconds, model_identity, readable_samples
from mcollapse.extraction.hooks import capture
from mcollapse.models.base import ModelFamily
from mcollapse.progress import progress_bar
from mcollapse.store.lock import is_read_only_error, read_only

log = logging.getLogger(__name__)

_FP16_MAX = 60000.0  # below float16's max with room for rounding


@dataclass
class Sequences:
    """Adapter outputs of the usable samples in selection order, plus the skipped ones."""

    ids: list[str]
    arrays: list[np.ndarray]
    key: str
    computed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def pooled(self) -> np.ndarray:
        """Mean over each sample's valid positions (n, d): the pooled adapter output."""
        return np.stack([a.astype(np.float64).mean(axis=0) for a in self.arrays])

    def subset(self, ids: list[str]) -> "Sequences":
        where = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return Sequences(list(ids), [self.arrays[where[i]] for i in ids], self.key, self.computed,
                         dict(self.skipped))


def _skip_reason(path: Path) -> str:
    reason = cache_store.read_json_object(path).get("reason")
    if not isinstance(reason, str):
        raise cache_store.Unreadable(path, "no skip reason recorded")
    return reason


class SequenceStore:
    def __init__(self, cache_dir: Path, key_fields: dict):
        self.entry = cache_store.entry(cache_dir, "sequences", {**key_fields, "kind": "adapter_sequences"})
        self.key = self.entry.key
        self.root = self.entry.path
        self._key_fields = key_fields

    def _record_entry(self) -> None:
        """entry.json (the key fields, for humans and `experiment=cache`), written with the first row."""
        entry = self.root / "entry.json"
        if not entry.exists():
            cache_store.write_json(entry, {"key": self.key, "fields": self._key_fields}, default=str)

    def _stem(self, sample_id: str) -> Path:
        return self.root / hashlib.sha256(sample_id.encode()).hexdigest()[:24]

    def get(self, sample_id: str) -> np.ndarray | None:
        """The stored output, or None: absent, or unreadable (then moved aside, to be recomputed)."""
        return self.entry.read_or_quarantine(self._stem(sample_id).with_suffix(".npy"), cache_store.read_npy)

    def skip_reason(self, sample_id: str) -> str | None:
        """Why the sample gave no output, or None: none recorded, or unreadable (moved aside, tried again)."""
        return self.entry.read_or_quarantine(self._stem(sample_id).with_suffix(".skip.json"), _skip_reason)

    def put(self, sample_id: str, array: np.ndarray) -> None:
        if not np.all(np.isfinite(array)):
            raise UserError(f"adapter output of sample {sample_id} is not finite (NaN/Inf)")
        if np.abs(array).max(initial=0.0) < _FP16_MAX:
            array = array.astype(np.float16)
        with cache_store.atomic_path(self._stem(sample_id).with_suffix(".npy")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)

    def put_skip(self, sample_id: str, reason: str) -> None:
        cache_store.write_json(self._stem(sample_id).with_suffix(".skip.json"), {"reason": reason}, indent=None)

    def missing(self, records: list[Record]) -> list[Record]:
        """The records with neither a stored output nor a skip record."""
        return [r for r in records if not self._stem(r.id).with_suffix(".npy").exists()
                and self.skip_reason(r.id) is None]


def _compute(family: ModelFamily, target, store: SequenceStore, todo: list[Record], strict: bool,
             label: str) -> int:
    """Run the encoder on ``todo`` (shortest clips first, to limit padding) and store each output."""
    if family.modality == "audio":
        todo = sorted(todo, key=audio_seconds)
    size = int(family.cfg.batch_size)
    computed = 0
    with progress_bar(f"adapter sequences {label}", total=len(todo)) as advance:
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            samples = readable_samples(chunk, strict, store.put_skip, family.sample_problem)
            if samples:
                batch = family.prepare(samples).to(family.device, family.dtype)
                inputs = dict(batch.inputs)
                hidden = capture(family.model, [target], lambda: family.model(**inputs, use_cache=False))
                out = hidden[target.name].float().cpu()
                lengths = batch.frame_lengths
                if target.role == "encoder_output" and batch.encoder_frame_lengths is not None:
                    lengths = batch.encoder_frame_lengths
                if lengths is None:
                    lengths = torch.full((out.shape[0],), out.shape[1])
                paths = {s.id: s.record.path for s in samples}
                for i, sample_id in enumerate(batch.ids):
                    if int(lengths[i]) == 0:  # an empty sequence would pool to NaN downstream
                        reason = f"{paths[sample_id].name}: too short: no {target.role} frame"
                        if strict:
                            raise UserError(f"sample {sample_id} ({paths[sample_id]}): {reason}")
                        store.put_skip(sample_id, reason)
                        continue
                    store.put(sample_id, out[i, : int(lengths[i])].numpy())
                    computed += 1
            advance(len(chunk))
    return computed


SEQUENCE_ROLES = ("adapter_output", "encoder_output")


def adapter_target(family: ModelFamily, role: str = "adapter_output"):
    from mcollapse.models.roles import resolve_hooks

    return resolve_hooks(family.model, [role], 0, dict(family.cfg.hook_paths or {}),
                         family.adapter_module_names())[0]


def adapter_sequences(family: ModelFamily, records: list[Record], dataset: dict, cache_dir: Path,
                      strict: bool = False, identity: dict | None = None,
                      role: str = "adapter_output") -> Sequences:
    """The adapter output of every record (or, with role=encoder_output, what the encoder hands the
    adapter: the sequences a projector trains on), computing only what the cache lacks."""
    if family.modality == "text":
        raise UserError(f"model '{family.cfg.name}' is text-only: it has no adapter output")
    if role not in SEQUENCE_ROLES:
        raise ValueError(f"sequence role {role!r} is not one of {SEQUENCE_ROLES}")
    target = adapter_target(family, role)
    identity = dict(identity or model_identity(family))
    identity.pop("lora", None)  # a merged LoRA is LLM-only (models.lora refuses others): same adapter output
    if role == "encoder_output":
        identity.pop("projector", None)  # the projector's input does not depend on its weights
    key = {**identity, "dataset": dataset, "adapter": [target.path, target.capture],
           "window": family.cfg.audio_window_s}
    if role != "adapter_output":
        key["role"] = role  # adapter-output keys stay as they were, so existing caches are kept
    store = SequenceStore(cache_dir, key)
    computed = 0
    found = {r.id: store.get(r.id) for r in records}  # a complete entry is read without the lock
    if store.missing(records):
        try:
            with store.entry.lock():
                # Another job may have computed them while this one waited for the lock.
                todo = store.missing(records)
                if todo:
                    store._record_entry()
                    computed = _compute(family, target, store, todo, strict, f"{family.cfg.name}/{dataset['name']}")
        except OSError as error:
            if is_read_only_error(error):
                raise read_only(store.root.parent, f"adapter sequences {store.key}") from None
            raise
        found.update({i: store.get(i) for i, array in found.items() if array is None})
    ids, arrays, skipped = [], [], {}
    for record in records:
        array = found[record.id]
        if array is None:
            skipped[record.id] = store.skip_reason(record.id) or "missing"
            continue
        ids.append(record.id)
        arrays.append(array)
    if strict and skipped:
        first = next(iter(skipped))
        raise UserError(f"{len(skipped)} unreadable sample(s), first {first}: {skipped[first]}")
    return Sequences(ids, arrays, store.key, computed, skipped)
