"""The run directory is checked before Hydra creates it: a path through a file, or a directory that
cannot be written, ends in one line instead of Hydra's traceback.

Hydra makes the directory before any mcollapse code runs, so the check composes the same config
first (the run dir depends on the experiment, model and dataset chosen) and looks at where it points.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mcollapse.errors import UserError

_MULTIRUN_FLAGS = ("-m", "--multirun")


def planned_run_dir(argv: list[str], config_dir: str) -> Path | None:
    """Where Hydra will write this command's run (a sweep: its sweep dir), or None when the
    command is not a plain run (--help, --cfg, ...) or does not compose (Hydra then says why)."""
    flags = [a for a in argv if a.startswith("-")]
    if any(flag not in _MULTIRUN_FLAGS for flag in flags):
        return None
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return Path(str(cfg.hydra.sweep.dir if flags else cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - the real composition reports it, in its own words
        return None


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
