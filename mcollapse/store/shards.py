"""Sharded, resumable passes: each batch's result is a durable shard, so an interrupted pass
continues where it stopped and concurrent jobs running the same pass compute each batch once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mcollapse.progress import progress_bar
from mcollapse.store.atomic import write_json, write_npz
from mcollapse.store.checked import read_npz
from mcollapse.store.entry import read_or_quarantine
from mcollapse.store.lock import lock

log = logging.getLogger(__name__)

SHARD_PATTERN = "batch-{:05d}.npz"


def _load(shard: Path, cache_dir: Path | None):
    """A shard's arrays, or None (moved aside, to be computed again) when it cannot be read."""
    if cache_dir is None:
        return read_npz(shard)
    return read_or_quarantine(cache_dir, shard, read_npz)


ENTRY_FILE = "entry.json"


def sharded_pass(rec, root: Path, batches: list[np.ndarray], label: str, compute, cache_dir: Path | None = None,
                 fields: dict | None = None):
    """Run `compute(rows) -> {name: per-row array}` over the batches, each result a durable shard.

    Returns `gather(name)`: that array over all rows in their original order (None if the pass does
    not produce it). Missing shards are computed under a lock on `root`; `rec` gets the counts and
    the stage time. A shard that cannot be read is moved aside to `cache_dir`'s quarantine. The
    key `fields` and the batch count go to `entry.json`, so `experiment=cache` can describe and
    verify the pass."""
    root = Path(root)
    shards = [root / SHARD_PATTERN.format(b) for b in range(len(batches))]
    rec.counts[f"{label}_batches"] = len(batches)
    rec.counts[f"{label}_batches_from_cache"] = len(batches)
    parts: list[dict | None] = [None] * len(shards)
    with rec.stage(label):
        for n, shard in enumerate(shards):
            if shard.is_file():
                parts[n] = _load(shard, cache_dir)
        if any(p is None for p in parts):
            with lock(root / ".lock", f"{label} pass {root.name}"):
                for n, shard in enumerate(shards):  # another job may have written some meanwhile
                    if parts[n] is None and shard.is_file():
                        parts[n] = _load(shard, cache_dir)
                done = sum(p is not None for p in parts)
                if done:
                    log.info("%s: %d of %d batches already cached", label, done, len(batches))
                rec.counts[f"{label}_batches_from_cache"] = done
                if not (root / ENTRY_FILE).is_file():
                    write_json(root / ENTRY_FILE, {"key": root.name, "fields": fields, "n_batches": len(batches)},
                               default=str)
                with progress_bar(label, total=len(batches)) as advance:
                    for n, (shard, rows) in enumerate(zip(shards, batches)):
                        if parts[n] is None:
                            arrays = {"rows": np.asarray(rows), **compute(rows)}
                            write_npz(shard, **arrays)
                            parts[n] = arrays
                        advance(1)
    position = np.concatenate([p["rows"] for p in parts])
    inverse = np.empty_like(position)
    inverse[position] = np.arange(len(position))

    def gather(name):
        if name not in parts[0]:
            return None
        return np.concatenate([p[name] for p in parts])[inverse]

    return gather
