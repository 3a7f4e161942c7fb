"""Build a directory artifact once: under its lock, staged, then renamed into place.

Built checkpoints and generated datasets are directories that must appear only complete and be
built by one process when several start at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mcollapse.store.atomic import publish_dir
from mcollapse.store.lock import lock


def shareable(root: Path) -> None:
    """Give every file and directory the umask's default mode.

    Some writers create files owner-only (through temporary files); an artifact shared by a group
    must stay readable to it."""
    mask = os.umask(0)
    os.umask(mask)
    for directory, names, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def build_once(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool],
               what: str) -> bool:
    """Make `target` hold what `build(staging)` writes, unless `is_complete(target)`; returns
    whether it built. Concurrent callers build once: the others wait on the lock, then find it."""
    target = Path(target)
    if is_complete(target):
        return False
    with lock(target.with_name(f".{target.name}.lock"), what):
        if is_complete(target):
            return False

        def staged(staging: Path) -> None:
            build(staging)
            shareable(staging)

        publish_dir(target, staged)
    return True
