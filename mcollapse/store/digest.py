"""Keys and digests: what makes two cached artifacts the same.

A key is a short sha256 of the canonical JSON of its fields; media are identified by their content
(hashed again whenever a file's size, mtime, inode or ctime changes) and texts by a digest of the
texts, so an overwritten, swapped or restored clip or an edited transcript never reuses stale entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_FIELD = "cache_format_version"
FORMAT_VERSION = 1
"""Bump when the stored layout or the meaning of stored values changes; it is part of every key."""

KEY_HEX_CHARS = 16
_HASH_BLOCK = 1 << 20


def _json_default(value: Any) -> Any:
    """Turn paths into strings; refuse anything else so a key never depends on a ``repr``."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(
        f"cache key field of type {type(value).__name__} is not JSON-serialisable; "
        "convert it (e.g. OmegaConf.to_container) before building the key"
    )


def canonical_json(fields) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def key(fields: dict) -> str:
    """Short sha256 of the canonical JSON of ``fields`` plus the store's format version."""
    if FORMAT_FIELD in fields:
        raise ValueError(f"key field name {FORMAT_FIELD!r} is reserved by the store")
    canonical = canonical_json({**fields, FORMAT_FIELD: FORMAT_VERSION})
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def ids_digest(ids) -> str:
    """The digest of an ordered list of sample ids (in keys, entry records and run summaries)."""
    return hashlib.sha256("\n".join(str(i) for i in ids).encode()).hexdigest()[:16]


def texts_digest(texts) -> str:
    """The digest of an ordered list of texts: an edited transcript changes it."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = (text or "").encode("utf-8")
        digest.update(f"{len(encoded)}\0".encode())
        digest.update(encoded)
    return digest.hexdigest()[:16]


def stat_signature(stat: os.stat_result) -> list[int]:
    """What must be unchanged for a memoised digest to stand (see `ContentDigests`)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class ContentDigests:
    """sha256 of media files, hashed again only when a file's stat signature changes.

    The signature is (size, mtime_ns, inode, ctime_ns). Size and mtime alone can be fooled: two
    same-size clips swapped with `mv` keep their mtimes, and `cp -p` or `rsync -a` restore the
    mtime after a same-size edit. Every write, rename or `tar -x` gives a new ctime (which user
    space cannot set back) or a new inode, so any of them means a new hash and a new key. With
    `memo_path` the digests persist across runs (a read-only store just rehashes)."""

    def __init__(self, memo_path: Path | None = None):
        self.memo_path = Path(memo_path) if memo_path else None
        self._memo: dict[str, list] = {}
        self._changed = False
        if self.memo_path is not None and self.memo_path.is_file():
            try:
                self._memo = json.loads(self.memo_path.read_text())
            except (OSError, ValueError):
                self._memo = {}  # an unreadable memo only costs a rehash
            if not isinstance(self._memo, dict):
                self._memo = {}

    def __call__(self, path: Path) -> str:
        signature = stat_signature(os.stat(path))
        name = os.path.abspath(path)  # not resolve(): 5x the stat's cost, and stat follows links anyway
        found = self._memo.get(name)
        if isinstance(found, list) and found[:-1] == signature:
            return found[-1]
        digest = file_sha256(path)
        self._memo[name] = [*signature, digest]
        self._changed = True
        return digest

    def save(self) -> None:
        if self.memo_path is None or not self._changed:
            return
        from mcollapse.store.atomic import write_json

        try:
            write_json(self.memo_path, self._memo, indent=None)
        except OSError:
            return  # a read-only store: the next run hashes again
        self._changed = False
