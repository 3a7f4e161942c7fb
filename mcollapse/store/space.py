"""A full disk ends a run in one line naming what could not be written, and how much it needed.

Every store write publishes a complete file or nothing, so what was stored before the disk filled
stays, and re-running the same command resumes from it. HDF5 writes are checked against the free
space first: HDF5 out of space mid-write can crash the process instead of raising.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from mcollapse.errors import UserError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_MESSAGES = ("No space left on device", "errno = 28", "Disk quota exceeded")  # h5py keeps no errno
HEADROOM_BYTES = 4 << 20  # HDF5 metadata, the directory entry, the filesystem's reserve


class StoreFull(UserError):
    """The disk (or quota) holding the store is full: nothing half-written is kept."""


def is_disk_full(error: BaseException) -> bool:
    if not isinstance(error, OSError):
        return False
    return error.errno in _FULL_ERRNOS or any(text in str(error) for text in _FULL_MESSAGES)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _free_bytes(path: Path) -> int | None:
    for directory in (Path(path), *Path(path).parents):
        if directory.exists():
            return shutil.disk_usage(directory).free
    return None


def disk_full(path: Path, needed: int | None = None) -> StoreFull:
    free = _free_bytes(Path(path).parent)
    sizes = ", ".join(part for part in (f"needs about {_megabytes(needed)}" if needed else "",
                                        f"{_megabytes(free)} free" if free is not None else "") if part)
    return StoreFull(f"no space left on the device to write {path}{f' ({sizes})' if sizes else ''}: free some "
                     "space or point paths.cache_dir at a larger disk; everything stored so far is kept and "
                     "re-running the same command resumes from it")


@contextlib.contextmanager
def full_disk_in_one_line(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn running out of space while writing `path` into `StoreFull`."""
    try:
        yield
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(path, needed) from None
        raise


def ensure_space(path: Path, needed: int) -> None:
    """Refuse, before writing, a file of about `needed` bytes that the disk cannot hold."""
    free = _free_bytes(Path(path).parent)
    if free is not None and free < needed + HEADROOM_BYTES:
        raise disk_full(path, needed + HEADROOM_BYTES)


_TORCH_WRITE_FAILURES = ("file write failed", "failed writing", "No space left")


def save_torch(state, path: Path) -> None:
    """torch.save, atomically, with a full disk in one line: torch reports a failed write as a
    RuntimeError from its zip writer ("file write failed"), not as an OSError."""
    import torch

    from mcollapse.store.atomic import atomic_path

    with full_disk_in_one_line(path), atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as error:
            if any(text in str(error) for text in _TORCH_WRITE_FAILURES):
                raise disk_full(path) from None
            raise
