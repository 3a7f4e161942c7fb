"""One keyed artifact of one kind: its path, its lock, and the quarantine for a corrupt copy."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mcollapse.errors import UserError
from mcollapse.store import digest
from mcollapse.store.checked import Unreadable
from mcollapse.store.kinds import kind as kind_named
from mcollapse.store.lock import is_read_only_error, lock

T = TypeVar("T")

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


@dataclass(frozen=True)
class Entry:
    """`path` is the entry's directory (layout "dir") or its file, named `<key><suffix>` ("file")."""

    kind: str
    key: str
    path: Path
    cache_dir: Path

    @property
    def lock_file(self) -> Path:
        if self.path.suffix:  # a file entry locks beside itself
            return self.path.with_name(f"{self.key}.lock")
        return self.path / ".lock"

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        with lock(self.lock_file, f"{self.kind} {self.key}", timeout):
            yield

    def quarantine(self, what: Path, error: BaseException | str) -> Path:
        return quarantine(self.cache_dir, what, error)

    def read_or_quarantine(self, path: Path, read: Callable[[Path], T]) -> T | None:
        return read_or_quarantine(self.cache_dir, path, read)


def cache_dir_of(path: Path, kind: str) -> Path:
    """The cache directory holding an entry of `kind` at `path` (for code handed only the entry's path)."""
    return Path(path).parents[len(Path(kind_named(kind).directory).parts)]


def entry(cache_dir: Path, kind: str, fields: dict, suffix: str = "") -> Entry:
    """The entry of `kind` keyed by `fields`, under `<cache_dir>/<kind's directory>/`."""
    found = kind_named(kind)
    entry_key = digest.key(fields)
    return Entry(kind, entry_key, Path(cache_dir) / found.directory / f"{entry_key}{suffix}", Path(cache_dir))


def quarantine(cache_dir: Path, what: Path, error: BaseException | str) -> Path:
    """Move a corrupt file or directory aside (it is recomputed), with a warning naming both places."""
    what = Path(what)
    aside = Path(cache_dir) / QUARANTINE_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{what.name}"
    try:
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(what, aside)
    except OSError as failure:
        if is_read_only_error(failure):
            raise UserError(f"cache file {what} is unreadable ({_reason(error)}) and the cache is not writable: "
                            "delete it, or point paths.cache_dir at a writable cache") from None
        raise
    log.warning("corrupt cache file %s (%s): moved to %s and computed again", what, error, aside)
    return aside


def _reason(error: BaseException | str) -> str:
    return error.reason if isinstance(error, Unreadable) else str(error)


def read_or_quarantine(cache_dir: Path, path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)` (a checked reader, raising `Unreadable`), or None: absent, or unreadable and
    then moved aside, so the caller computes it again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read(path)
    except Unreadable as broken:
        quarantine(cache_dir, broken.path if broken.path.exists() else path, broken.reason)
        return None
