"""The run directory is checked before Hydra creates it (the CLI's RunDirCheck callback, on the
composed config): a path through a file, or a directory that cannot be written, ends in one line
instead of Hydra's traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mcollapse.errors import UserError


def check_writable(run_dir: Path) -> None:
    """Raise a one-line `UserError` when `run_dir` cannot be created or written."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UserError(f"cannot create the run directory {run_dir}: {existing} is a file "
                        "(move it, or set hydra.run.dir to another directory)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"cannot write the run directory {run_dir}: {existing} is not writable "
                        f"({error.strerror or error}); run from a writable directory or set hydra.run.dir") from None
