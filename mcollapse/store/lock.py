"""The store's inter-process lock: concurrent jobs needing one artifact compute it once.

flock-based, so the OS drops a lock whose holder dies. A wait is logged, so a job that seems idle
says why; a store the user cannot write to ends in one line naming what could not be written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path

import filelock

from mcollapse.errors import UserError

log = logging.getLogger(__name__)

_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class ReadOnlyStore(UserError):
    """The cache directory cannot be written: complete entries are served, nothing new is stored."""


def is_read_only_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _READ_ONLY_ERRNOS


def read_only(path: Path, what: str) -> ReadOnlyStore:
    return ReadOnlyStore(f"cache directory {path} is not writable: cannot store {what} "
                         "(complete entries are still served; point paths.cache_dir at a writable one)")


@contextlib.contextmanager
def lock(lock_file: Path, what: str = "this entry", timeout: float | None = None) -> Iterator[None]:
    """Hold the lock `lock_file` while checking for, and computing, a cached artifact.

    The holder may have written the artifact meanwhile, so look again after acquiring. Raises
    ``filelock.Timeout`` (a ``TimeoutError``) if ``timeout`` seconds pass first."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        held = filelock.FileLock(str(lock_file))
        try:
            held.acquire(timeout=0)
        except filelock.Timeout:
            log.info("waiting for another process computing %s (lock %s)", what, lock_file)
            held.acquire(timeout=-1 if timeout is None else timeout)
    except OSError as error:
        if is_read_only_error(error):
            raise read_only(lock_file.parent, what) from None
        raise
    try:
        yield
    finally:
        held.release()
