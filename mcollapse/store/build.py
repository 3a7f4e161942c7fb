"""Build a directory artifact once: under its lock, staged, then renamed into place.

Built checkpoints and generated datasets are directories that must appear only complete and be
built by one process when several start at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mcollapse.store.atomic import publish_dir
from mcollapse.store.checked import Unreadable, check_tree
from mcollapse.store.entry import quarantine
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
               what: str, cache_dir: Path | None = None) -> bool:
    """Make `target` hold what `build(staging)` writes, unless `is_complete(target)`; returns
    whether it built. Concurrent callers build once: the others wait on the lock, then find it.

    With `cache_dir`, a complete target with a file that does not open (a truncated safetensors,
    a garbage config.json) is moved to its quarantine and built again."""
    target = Path(target)
    if is_complete(target) and not _broken(target, cache_dir):
        return False
    with lock(target.with_name(f".{target.name}.lock"), what):
        if is_complete(target):
            broken = _broken(target, cache_dir)
            if not broken:
                return False
            quarantine(cache_dir, target, f"{what}: {'; '.join(b.reason + ' in ' + b.path.name for b in broken)}")

        def staged(staging: Path) -> None:
            build(staging)
            shareable(staging)

        publish_dir(target, staged)
    return True


def _broken(target: Path, cache_dir: Path | None) -> list[Unreadable]:
    """The files of a built directory that do not open, by the quick checks (what a truncation or a
    garbage write breaks; nothing is loaded); none unless the caller gave a cache to quarantine to."""
    return check_tree(target, thorough=False) if cache_dir is not None else []
