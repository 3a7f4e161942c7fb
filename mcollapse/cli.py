"""Command line: `mcollapse experiment=<name> model=<name> dataset=<name> [overrides]`.

Hydra composes the config; this module validates it, seeds, dispatches `experiment.name` through
the registry in mcollapse.experiments, turns user errors into one line, and keeps a failing sweep
job from stopping the others (the sweep still exits non-zero at the end). Exit statuses are the
EXIT_* constants of mcollapse.errors.
"""

from __future__ import annotations

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
from mcollapse.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from mcollapse.experiments import experiment_module
from mcollapse.interrupt import close as close_interrupts
from mcollapse.interrupt import install as route_ctrl_c
from mcollapse.report.runs import FAILED
from mcollapse.run_dir import check_writable
from mcollapse.runtime import release_memory, seed_everything, set_threads

log = logging.getLogger("mcollapse")

_failed_jobs: list[str] = []
_job_started = False  # Hydra exits 1 on a composition error (a bad override) before any job starts
_cache_dir: str | None = None  # named in the line printed on Ctrl-C


def config_dir() -> str:
    """Configs ship inside the wheel (mcollapse/conf); a source checkout keeps them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError("mcollapse configs not found; the installation is incomplete")


class RunDirCheck(Callback):
    """Before Hydra creates the run (or sweep) dir: one line, exit 2, when it cannot be written
    (a path through a file, a read-only directory) instead of Hydra's traceback. A callback's
    exception would be turned into a warning, so it exits itself."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(run_dir) -> None:
        try:
            check_writable(Path(str(run_dir)))
        except UserError as error:
            print(f"mcollapse: error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)


class SweepFailureReport(Callback):
    """After a sweep, list the jobs that failed so the launcher can exit non-zero."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for marker in sorted(sweep_dir.rglob(FAILED)):
            info = json.loads(marker.read_text())
            _failed_jobs.append(f"{marker.parent}: {info.get('error')}")


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
    seed_everything(cfg.seed)
    set_threads(cfg.threads, cfg.model.small)
    experiment_module(cfg.experiment.name).run(cfg, run_dir)


def _run(cfg: DictConfig) -> None:
    _configure_console()
    run_job(cfg, Path(HydraConfig.get().runtime.output_dir))


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


register()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    global _job_started, _cache_dir
    _job_started = True
    _cache_dir = str(cfg.paths.cache_dir)
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
        (run_dir / FAILED).write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}, indent=2))
    finally:
        release_memory()


def _interrupted_line() -> str:
    where = f" in {_cache_dir}" if _cache_dir else ""
    return (f"mcollapse: interrupted; every finished cache entry, shard and batch is saved{where}, "
            "and re-running the same command resumes from them")


def _exit_interrupted() -> None:
    print(_interrupted_line(), file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    route_ctrl_c()  # already done by mcollapse.launch before the heavy imports; here for direct callers
    try:
        _app()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exit_:
        if exit_.code == EXIT_FAILED and not _job_started:  # Hydra printed why the config did not compose
            sys.exit(EXIT_USER_ERROR)
        raise
    if close_interrupts(_interrupted_line()):  # pressed after the last safe point: the exit says it was asked to stop
        _exit_interrupted()
    if _failed_jobs:
        print(f"mcollapse: {len(_failed_jobs)} sweep job(s) failed:", file=sys.stderr)
        for line in _failed_jobs:
            print(f"  {line}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
