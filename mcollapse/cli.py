"""Command line: `mcollapse experiment=<name> model=<name> dataset=<name> [overrides]`.

Hydra composes the config; this module validates it, seeds, dispatches `experiment.name` to
`mcollapse.experiments.<name>.run`, turns user errors into one line, and keeps a failing sweep
job from stopping the others (the sweep still exits non-zero at the end). Exit statuses are the
EXIT_* constants of mcollapse.errors.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mcollapse.config import register, validate
from mcollapse.errors import EXIT_FAILED, EXIT_USER_ERROR, UserError
from mcollapse.runtime import release_memory, seed_everything

log = logging.getLogger("mcollapse")

FAILURE_FILE = "failed.json"
_failed_jobs: list[str] = []
_job_started = False  # Hydra exits 1 on a composition error (a bad override) before any job starts


def config_dir() -> str:
    """Configs ship inside the wheel (mcollapse/conf); a source checkout keeps them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError("mcollapse configs not found; the installation is incomplete")


class SweepFailureReport(Callback):
    """After a sweep, list the jobs that failed so the launcher can exit non-zero."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for marker in sorted(sweep_dir.rglob(FAILURE_FILE)):
            info = json.loads(marker.read_text())
            _failed_jobs.append(f"{marker.parent}: {info.get('error')}")


def _experiment(name: str):
    try:
        return importlib.import_module(f"mcollapse.experiments.{name}")
    except ModuleNotFoundError:
        raise UserError(f"experiment '{name}' has no implementation") from None


def _configure_console() -> None:
    """Rich log lines and progress bars on a terminal; plain, bar-free output otherwise."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        root.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def run_job(cfg: DictConfig, run_dir: Path) -> None:
    """Validate, seed and run one composed config into run_dir: the job the CLI runs, callable
    without a process of its own (the tests run most experiments this way)."""
    validate(cfg)
    seed_everything(int(cfg.seed), cfg.threads)
    _experiment(cfg.experiment.name).run(cfg, run_dir)


def _run(cfg: DictConfig) -> None:
    _configure_console()
    run_job(cfg, Path(HydraConfig.get().runtime.output_dir))


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


register()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    try:
        _run(cfg)
    except Exception as err:  # noqa: BLE001 - a sweep job's failure must not end the sweep
        if not _is_multirun():
            if isinstance(err, UserError):
                log.error("%s", err)
                print(f"mcollapse: error: {err}", file=sys.stderr)
                sys.exit(err.exit_code)
            raise
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log.error("job failed: %s\n%s", err, traceback.format_exc())
        (run_dir / FAILURE_FILE).write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}, indent=2))
    finally:
        release_memory()


def main() -> None:
    try:
        _app()
    except SystemExit as exit_:
        if exit_.code == EXIT_FAILED and not _job_started:  # Hydra printed why the config did not compose
            sys.exit(EXIT_USER_ERROR)
        raise
    if _failed_jobs:
        print(f"mcollapse: {len(_failed_jobs)} sweep job(s) failed:", file=sys.stderr)
        for line in _failed_jobs:
            print(f"  {line}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
