"""Content-keyed, crash-safe store for pooled activations.

An entry is identified by a hash of everything that determines its contents (model and revision,
dataset and sample selection, hooks, pooling, prompt, format version), so a changed setting never
reuses stale vectors and identical settings are shared by every experiment and run.

Layout of one entry, ``<cache_dir>/activations/<key>/``::

    entry.json          key fields, key, format version, sample count and ids digest (for humans
                        and to catch callers whose key fields do not pin the sample selection)
    .lock               inter-process lock file (flock; the OS drops it if the holder dies)
    shards/shard-*.h5   rows and skip records written since the previous flush; each appears
                        under its final name only after it is complete and fsynced
    activations.h5      the consolidated entry; its presence alone means "complete"

HDF5 files can be corrupted by a process that dies mid-write, so no file a reader trusts is ever
written in place: every file is written under a temporary name, fsynced and renamed. A crash thus
leaves only complete shards (trusted) and temporary files (ignored, removed under the lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mcollapse import store
from mcollapse.store.atomic import TMP_PREFIX as _TMP_PREFIX
from mcollapse.store.atomic import publish as _publish
from mcollapse.store.digest import FORMAT_VERSION
from mcollapse.store.lock import is_read_only_error, read_only
from mcollapse.store.space import ensure_space, full_disk_in_one_line

log = logging.getLogger(__name__)

_KIND = "activations"
_FINAL_NAME = "activations.h5"
_ENTRY_NAME = "entry.json"
_SHARD_DIR = "shards"
_SHARD_PREFIX = "shard-"
_CHUNK_TARGET_BYTES = 1 << 20
_CHUNK_CACHE_BYTES = 16 << 20
_MAX_IDS_IN_MESSAGE = 10


def _repeated(ids: list[str]) -> list[str]:
    return [sample_id for sample_id, count in Counter(ids).items() if count > 1]


def _name_ids(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def _write_json_atomically(path: Path, payload: dict) -> None:
    store.write_json(path, payload, default=str, ensure_ascii=False)


def _string_dataset(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())


def _read_strings(group: h5py.Group, name: str) -> list[str]:
    return list(group[name].asstr()[()]) if name in group else []


def _contiguous_runs(positions: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Split sorted positions into runs of consecutive integers: (first position, start, stop).

    Rows usually arrive in original order, so whole shards become single slice writes instead
    of slow point selections.
    """
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(positions)]))
    for start, stop in zip(starts.tolist(), stops.tolist()):
        yield int(positions[start]), start, stop


@contextlib.contextmanager
def _h5_written(tmp_path: Path, final_path: Path, needed: int, **options) -> Iterator[h5py.File]:
    """An HDF5 file written at `tmp_path` and published as `final_path`, or nothing (the temporary
    removed). The free space is checked first and a full disk ends in one line; the shards already
    published stay, so a re-run resumes."""
    ensure_space(final_path, needed)
    try:
        with full_disk_in_one_line(final_path, needed):
            with h5py.File(tmp_path, "w", locking=False, **options) as f:
                yield f
            _publish(tmp_path, final_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


class UnknownHooks(KeyError):
    """Hooks asked for that the entry does not hold (a caller's error, not a corrupt entry)."""


class CorruptEntry(Exception):
    def __init__(self, path: Path, error: BaseException):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


def is_published(cache_dir: Path, key_fields: dict) -> bool:
    """Whether the entry for these key fields is complete, asked without creating anything (an
    `ActivationStore` records its entry on construction, which a mere question should not do)."""
    return (store.entry(cache_dir, _KIND, key_fields).path / _FINAL_NAME).is_file()


@dataclass
class Activations:
    """Pooled vectors of one cache entry, rows in the original sample order."""

    ids: list[str]
    vectors: dict[str, np.ndarray]
    skipped: dict[str, str]
    key_fields: dict


@dataclass
class _Shard:
    """What a published shard contributes; its vectors are read again only at finalize."""

    path: Path
    ids: list[str]
    skipped: dict[str, str]


class ActivationStore:
    """One cache entry: buffered writes, durable shards, and a consolidated final file.

    Writers should hold :meth:`lock` so that concurrent jobs wanting the same entry compute each
    row once: the second job waits, then finds the entry complete (or resumes a dead one's work).
    """

    def __init__(self, cache_dir: Path, key_fields: dict, ids: list[str], flush_every: int = 64):
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        ids = [str(i) for i in ids]
        duplicates = _repeated(ids)
        if duplicates:
            raise ValueError(f"sample ids must be unique; repeated: {_name_ids(duplicates)}")

        self.key_fields: dict = json.loads(store.canonical_json(key_fields))
        self.key: str = store.key(key_fields)
        self._entry = store.entry(cache_dir, _KIND, key_fields)
        self.path: Path = self._entry.path
        self.flush_every = flush_every
        self._ids = ids
        self._position = {sample_id: n for n, sample_id in enumerate(ids)}
        self._final_path = self.path / _FINAL_NAME
        self._shard_dir = self.path / _SHARD_DIR
        self._check_or_write_entry_json()

        # On-disk state, extended incrementally as new shards appear.
        self._shards: dict[str, _Shard] = {}
        self._unreadable_shards: set[str] = set()
        self._row_shard: dict[str, str] = {}
        self._disk_skipped: dict[str, str] = {}
        self._hook_dims: dict[str, int] = {}

        # Rows and skip records accepted but not yet written.
        self._buffer_ids: list[str] = []
        self._buffer_id_set: set[str] = set()
        self._buffer_vectors: dict[str, list[np.ndarray]] = {}
        self._buffer_skipped: dict[str, str] = {}

        self._refresh(remove_leftovers=False)

    # ------------------------------------------------------------------ state

    def _check_or_write_entry_json(self) -> None:
        """Record what this entry is; refuse to mix two sample selections under one key."""
        entry_path = self.path / _ENTRY_NAME
        digest = store.ids_digest(self._ids)
        recorded = self._entry.read_or_quarantine(entry_path, store.read_json_object)
        if recorded is not None:
            if recorded.get("ids_digest", digest) != digest:
                raise ValueError(
                    f"activation cache entry {self.key} was created for a different list of sample "
                    "ids; the key fields must include the sample selection"
                )
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(entry_path, self._entry_record(digest))
        except OSError as error:
            if not is_read_only_error(error):
                raise
            if not self.is_complete():  # a complete entry is served as it is
                raise read_only(self.path.parent, f"activations entry {self.key}") from None

    def _entry_record(self, digest: str) -> dict:
        return {"key": self.key, "format_version": FORMAT_VERSION, "key_fields": self.key_fields,
                "n_ids": len(self._ids), "ids_digest": digest}

    def _refresh(self, remove_leftovers: bool) -> None:
        """Pick up shards published since the last look (possibly by another process).

        Temporary files are never trusted. They are deleted only when ``remove_leftovers`` is set,
        i.e. under the lock, because without it they may belong to a live writer.
        """
        if remove_leftovers:
            self._remove_leftovers()
        if self.is_complete() or not self._shard_dir.is_dir():
            return
        for shard_path in sorted(self._shard_dir.glob(f"{_SHARD_PREFIX}*.h5")):
            name = shard_path.name
            if name in self._shards or name in self._unreadable_shards:
                continue
            try:
                shard, dims = self._read_shard_index(shard_path)
            except (OSError, KeyError, json.JSONDecodeError) as error:
                # Published shards are fsynced before the rename, so this means disk trouble;
                # their rows are simply computed again.
                log.warning("ignoring unreadable activation shard %s: %s", shard_path, error)
                self._unreadable_shards.add(name)
                continue
            unknown = [i for i in [*shard.ids, *shard.skipped] if i not in self._position]
            if unknown:
                raise ValueError(f"{shard_path} holds ids outside this entry: {_name_ids(unknown)}")
            if shard.ids:
                self._check_hook_dims(dims, source=str(shard_path))
            self._shards[name] = shard
            for sample_id in shard.ids:
                # Two unlocked writers may have produced the same row; the first shard wins.
                self._row_shard.setdefault(sample_id, name)
                self._disk_skipped.pop(sample_id, None)
            for sample_id, reason in shard.skipped.items():
                if sample_id not in self._row_shard:
                    self._disk_skipped.setdefault(sample_id, reason)

    @staticmethod
    def _read_shard_index(shard_path: Path) -> tuple[_Shard, dict[str, int]]:
        """Ids, skip records and hook widths of a shard, without loading its vectors."""
        with h5py.File(shard_path, "r", locking=False) as f:
            ids = _read_strings(f, "ids")
            skipped = dict(
                zip(_read_strings(f, "skipped_ids"), _read_strings(f, "skipped_reasons"))
            )
            hooks = json.loads(f.attrs["hooks"])
            dims = {hook: int(f["vectors"][hook].shape[1]) for hook in hooks}
        return _Shard(path=shard_path, ids=ids, skipped=skipped), dims

    def _check_hook_dims(self, dims: dict[str, int], source: str) -> None:
        if self._hook_dims and set(dims) != set(self._hook_dims):
            raise ValueError(
                f"{source}: hooks {sorted(dims)} differ from earlier rows' "
                f"{sorted(self._hook_dims)}"
            )
        for hook, dim in dims.items():
            if self._hook_dims.get(hook, dim) != dim:
                raise ValueError(
                    f"{source}: hook {hook!r} has width {dim}, earlier rows have "
                    f"{self._hook_dims[hook]}"
                )
        if not self._hook_dims:
            self._hook_dims = dict(dims)

    def _remove_leftovers(self) -> None:
        """Delete files a killed writer left half-written, and shards of a finished entry.

        Only files that lock holders write are swept: ``entry.json`` is written without the lock,
        so its temporary file may belong to a process that is starting up right now.
        """
        for tmp_path in self.path.glob(f"{_TMP_PREFIX}*-{_FINAL_NAME}"):
            tmp_path.unlink(missing_ok=True)
        if self.is_complete():
            shutil.rmtree(self._shard_dir, ignore_errors=True)
        elif self._shard_dir.is_dir():
            for tmp_path in self._shard_dir.glob(f"{_TMP_PREFIX}*"):
                tmp_path.unlink(missing_ok=True)

    def _accounted(self, sample_id: str) -> bool:
        return (
            sample_id in self._row_shard
            or sample_id in self._disk_skipped
            or sample_id in self._buffer_skipped
            or sample_id in self._buffer_id_set
        )

    # ------------------------------------------------------------------ public API

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[ActivationStore]:
        """Hold the entry's inter-process lock; on entry, see what other processes wrote.

        Buffered rows are flushed when the block exits (also on error: they are valid rows).
        Raises ``filelock.Timeout`` (a ``TimeoutError``) if ``timeout`` seconds pass first.
        """
        with self._entry.lock(timeout):
            self._refresh(remove_leftovers=True)
            try:
                yield self
            finally:
                if not self.is_complete():
                    self.flush()

    def is_complete(self) -> bool:
        return self._final_path.exists()

    def pending_ids(self) -> list[str]:
        """Ids, in original order, neither written (or buffered) nor recorded as skipped."""
        if self.is_complete():
            return []
        return [i for i in self._ids if not self._accounted(i)]

    def add(self, ids: list[str], vectors: dict[str, np.ndarray]) -> None:
        """Buffer rows for ``ids``; all-or-nothing, so a rejected batch leaves no trace."""
        if self.is_complete():
            raise ValueError(f"activation cache entry {self.key} is already complete")
        ids = [str(i) for i in ids]
        self._check_new_ids(ids)
        if not vectors:
            raise ValueError("add() needs at least one hook's vectors")

        rows: dict[str, np.ndarray] = {}
        for hook, array in vectors.items():
            if not isinstance(hook, str) or not hook or "/" in hook or hook == ".":
                raise ValueError(f"hook name {hook!r} cannot name an HDF5 dataset")
            array = np.asarray(array)
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"hook {hook!r}: expected floating vectors, got {array.dtype}")
            if array.ndim != 2 or array.shape[0] != len(ids):
                raise ValueError(
                    f"hook {hook!r}: expected shape ({len(ids)}, d), got {tuple(array.shape)}"
                )
            rows[hook] = np.ascontiguousarray(array, dtype=np.float32)

        bad_rows = np.zeros(len(ids), dtype=bool)
        for array in rows.values():
            bad_rows |= ~np.isfinite(array).all(axis=1)
        if bad_rows.any():
            bad_ids = [i for i, bad in zip(ids, bad_rows) if bad]
            raise ValueError(
                f"non-finite (NaN/Inf) activations for sample ids {_name_ids(bad_ids)}"
            )

        self._check_hook_dims({h: a.shape[1] for h, a in rows.items()}, source="add()")
        self._buffer_ids.extend(ids)
        self._buffer_id_set.update(ids)
        for hook, array in rows.items():
            self._buffer_vectors.setdefault(hook, []).append(array)
        self._flush_if_due()

    def add_skipped(self, sample_id: str, reason: str) -> None:
        """Record that a sample gave no row (unreadable media, OOM, ...) so it is not retried."""
        if self.is_complete():
            raise ValueError(f"activation cache entry {self.key} is already complete")
        sample_id = str(sample_id)
        self._check_new_ids([sample_id])
        self._buffer_skipped[sample_id] = str(reason)
        self._flush_if_due()

    def flush(self) -> None:
        """Write buffered rows and skip records as one new shard, durably."""
        if not self._buffer_ids and not self._buffer_skipped:
            return
        self._shard_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"
        tmp_path = self._shard_dir / f"{_TMP_PREFIX}{stem}"
        shard_path = self._shard_dir / f"{_SHARD_PREFIX}{stem}"
        hooks = list(self._buffer_vectors)
        needed = sum(a.nbytes for arrays in self._buffer_vectors.values() for a in arrays)
        with _h5_written(tmp_path, shard_path, needed) as f:
            f.attrs["hooks"] = json.dumps(hooks)
            _string_dataset(f, "ids", self._buffer_ids)
            group = f.create_group("vectors")
            for hook in hooks:
                group.create_dataset(hook, data=np.concatenate(self._buffer_vectors[hook]))
            _string_dataset(f, "skipped_ids", list(self._buffer_skipped))
            _string_dataset(f, "skipped_reasons", list(self._buffer_skipped.values()))

        self._shards[shard_path.name] = _Shard(
            path=shard_path, ids=list(self._buffer_ids), skipped=dict(self._buffer_skipped)
        )
        for sample_id in self._buffer_ids:
            self._row_shard.setdefault(sample_id, shard_path.name)
        self._disk_skipped.update(self._buffer_skipped)
        self._buffer_ids = []
        self._buffer_id_set = set()
        self._buffer_vectors = {}
        self._buffer_skipped = {}

    def finalize(self) -> None:
        """Consolidate all shards into the final file in original id order; marks it complete.

        Every id must have a row or a skip record. Memory stays at one shard's rows at a time.
        """
        if self.is_complete():
            return
        self.flush()
        self._refresh(remove_leftovers=False)
        missing = self.pending_ids()
        if missing:
            raise ValueError(
                f"cannot finalize activation cache entry {self.key}: {len(missing)} ids have "
                f"neither a row nor a skip record: {_name_ids(missing)}"
            )

        present = sorted(self._row_shard, key=self._position.__getitem__)
        out_row = {sample_id: n for n, sample_id in enumerate(present)}
        skipped = sorted(self._disk_skipped, key=self._position.__getitem__)
        hooks = list(self._hook_dims)

        tmp_path = self.path / f"{_TMP_PREFIX}{uuid.uuid4().hex}-{_FINAL_NAME}"
        needed = 4 * len(present) * sum(self._hook_dims.values())
        with _h5_written(tmp_path, self._final_path, needed, rdcc_nbytes=_CHUNK_CACHE_BYTES) as f:
            f.attrs["key"] = self.key
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["key_fields"] = store.canonical_json(self.key_fields)
            f.attrs["hooks"] = json.dumps(hooks)
            _string_dataset(f, "ids", present)
            _string_dataset(f, "skipped_ids", skipped)
            _string_dataset(f, "skipped_reasons", [self._disk_skipped[i] for i in skipped])
            group = f.create_group("vectors")
            outputs = {
                hook: group.create_dataset(
                    hook,
                    shape=(len(present), self._hook_dims[hook]),
                    dtype=np.float32,
                    chunks=self._chunk_shape(len(present), self._hook_dims[hook]),
                )
                for hook in hooks
            }
            for name, shard in self._shards.items():
                keep = [n for n, i in enumerate(shard.ids) if self._row_shard[i] == name]
                if not keep:
                    continue
                targets = np.array([out_row[shard.ids[n]] for n in keep])
                order = np.argsort(targets, kind="stable")
                source_rows = np.array(keep)[order]
                targets = targets[order]
                with h5py.File(shard.path, "r", locking=False) as source:
                    for hook in hooks:
                        rows = source["vectors"][hook][()][source_rows]
                        for first, start, stop in _contiguous_runs(targets):
                            outputs[hook][first : first + stop - start] = rows[start:stop]
        shutil.rmtree(self._shard_dir, ignore_errors=True)
        self._shards.clear()

    def read(self, hooks: Iterable[str] | None = None) -> Activations:
        """Load the complete entry (all hooks, or only ``hooks``) with one HDF5 open.

        A final file that cannot be read is moved aside (see :meth:`read_if_sound`)."""
        if not self.is_complete():
            raise ValueError(
                f"activation cache entry {self.key} is incomplete; "
                f"{len(self.pending_ids())} ids pending"
            )
        try:
            with h5py.File(self._final_path, "r", locking=False) as f:
                stored_hooks = json.loads(f.attrs["hooks"])
                wanted = stored_hooks if hooks is None else list(hooks)
                unknown = [h for h in wanted if h not in stored_hooks]
                if unknown:
                    raise UnknownHooks(f"hooks {unknown} not in cache entry {self.key} ({stored_hooks})")
                return Activations(
                    ids=_read_strings(f, "ids"),
                    vectors={hook: f["vectors"][hook][()] for hook in wanted},
                    skipped=dict(
                        zip(_read_strings(f, "skipped_ids"), _read_strings(f, "skipped_reasons"))
                    ),
                    key_fields=json.loads(f.attrs["key_fields"]),
                )
        except UnknownHooks:
            raise
        except (OSError, KeyError, ValueError) as error:
            raise CorruptEntry(self._final_path, error) from error

    def read_if_sound(self, hooks: Iterable[str] | None = None) -> Activations | None:
        """The complete entry, or None: absent, or corrupt (then moved aside, to be recomputed)."""
        if not self.is_complete():
            return None
        try:
            return self.read(hooks)
        except CorruptEntry as corrupt:
            try:
                self._entry.quarantine(corrupt.path, corrupt.error)
            except OSError as error:
                if is_read_only_error(error):
                    raise read_only(self.path.parent, f"a new activations entry {self.key} "
                                    f"in place of the corrupt {corrupt.path}") from None
                raise
            return None

    # ------------------------------------------------------------------ helpers

    def _check_new_ids(self, ids: list[str]) -> None:
        unknown = [i for i in ids if i not in self._position]
        if unknown:
            raise ValueError(f"sample ids not in this cache entry: {_name_ids(unknown)}")
        repeated = _repeated(ids) + [i for i in ids if self._accounted(i)]
        if repeated:
            raise ValueError(f"sample ids already written or skipped: {_name_ids(repeated)}")

    def _flush_if_due(self) -> None:
        if len(self._buffer_ids) + len(self._buffer_skipped) >= self.flush_every:
            self.flush()

    @staticmethod
    def _chunk_shape(n_rows: int, dim: int) -> tuple[int, int]:
        """About 1 MiB per chunk, so HDF5's chunk cache absorbs shard-by-shard writes."""
        rows_per_chunk = max(1, _CHUNK_TARGET_BYTES // (4 * max(dim, 1)))
        return (max(1, min(n_rows, rows_per_chunk)), max(dim, 1))
