"""The run-dir contract: results.json + results.csv (long format) and meta.json for every run."""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from mcollapse.store.atomic import atomic_path, write_text

ROW_COLUMNS = ["experiment", "model", "dataset", "hook", "info_type", "seed", "metric", "value"]
PACKAGES = ("mcollapse", "torch", "transformers", "peft", "numpy", "scikit-learn", "hydra-core", "h5py", "pot")


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass
class RunRecorder:
    """Collects stage timings, counts and result rows, then writes the run dir's files."""

    run_dir: Path
    identity: dict  # experiment, model, dataset
    stages: dict[str, float] = field(default_factory=dict)
    counts: dict[str, object] = field(default_factory=dict)
    extra_meta: dict[str, object] = field(default_factory=dict)
    summary_fields: dict[str, object] = field(default_factory=dict)  # every summary of the run carries them

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 3)

    def row(self, hook: str, info_type: str, seed, metric: str, value, **extra) -> dict:
        return {**self.identity, "hook": hook, "info_type": info_type, "seed": seed, "metric": metric,
                "value": value, **extra}

    def write(self, rows: list[dict], summary: dict, details: dict | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        payload = {**self.identity, "summary": {**self.summary_fields, **summary}, "counts": self.counts,
                   "rows": rows, **(details or {})}
        write_text(self.run_dir / "results.json", json.dumps(payload, indent=2, default=_plain))
        columns = list(ROW_COLUMNS)
        for row in rows:
            columns += [k for k in row if k not in columns]
        with atomic_path(self.run_dir / "results.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.write_meta()

    def write_meta(self) -> None:
        device = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        meta = {
            **self.identity,
            "git_sha": _git_sha(),
            "packages": _versions(),
            "python": platform.python_version(),
            "device": device,
            "threads": torch.get_num_threads(),  # as chosen by the threads setting (config.threads)
            "stage_seconds": self.stages,
            "counts": self.counts,
            **self.extra_meta,
        }
        write_text(self.run_dir / "meta.json", json.dumps(meta, indent=2, default=_plain))


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
