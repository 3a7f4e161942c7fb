"""Atomic, durable publication: a reader sees a file or directory complete, or not at all.

One fsync policy for everything the store writes: the new file (or every file of a new directory)
is fsynced, renamed onto its final name, and the parent directory is fsynced so the rename itself
survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mcollapse.store.space import full_disk_in_one_line

TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory fsync makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def publish(tmp_path: Path, final_path: Path) -> None:
    """Make a fully written temporary file or directory visible under its final name, durably.

    A directory replaces an existing one only when that one is absent; callers that swap a
    directory move the old one aside first."""
    tmp_path, final_path = Path(tmp_path), Path(final_path)
    if tmp_path.is_dir():
        _fsync_tree(tmp_path)
    else:
        fsync_path(tmp_path)
    os.replace(tmp_path, final_path)
    fsync_path(final_path.parent)


def tmp_name(final_path: Path) -> Path:
    """A unique temporary sibling of `final_path`, ignored by readers and swept under the lock."""
    final_path = Path(final_path)
    return final_path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{final_path.name}")


@contextlib.contextmanager
def atomic_path(final_path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is published as `final_path`, else removed.
    A full disk ends in one line (`StoreFull`)."""
    final_path = Path(final_path)
    with full_disk_in_one_line(final_path):
        final_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(final_path)
        try:
            yield tmp
            publish(tmp, final_path)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: Path, payload, *, default: Callable | None = float, indent: int = 2, **options) -> None:
    write_text(path, json.dumps(payload, indent=indent, default=default, **options))


def write_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def publish_dir(target: Path, build: Callable[[Path], None]) -> None:
    """Build a directory with `build(staging)` and swap it in for `target` (an old one is removed).

    Hold the entry's lock around the call. The staging directory sits next to the target, so the
    rename never crosses a file system; a killed builder's staging directories are swept here."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{TMP_PREFIX}*-{target.name}"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = tmp_name(target)
    with full_disk_in_one_line(target):
        staging.mkdir()
        try:
            build(staging)
            _fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    old = tmp_name(target) if target.exists() else None
    if old is not None:
        os.replace(target, old)
    os.replace(staging, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
