"""Find and read finished run dirs (a multirun dir, run dirs, or globs) for the report and verify.

A run dir is one with `results.json`; its `.hydra/config.yaml` says which settings produced the
numbers (loss target, probe preset, pooling, LoRA adapter). Dirs holding `failed.json` instead, and
unreadable results, are kept as problems so the report can list them rather than drop them.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mcollapse.errors import UserError

RESULTS = "results.json"
FAILED = "failed.json"
OWN_EXPERIMENTS = ("report", "verify")  # outputs of the readers themselves are not inputs


@dataclass
class Run:
    """One finished run: what it measured and with which settings."""

    path: Path
    experiment: str
    model: str  # the model's config name, plus `+lora-<digest>` when an adapter was merged
    dataset: str
    family: str | None
    modality: str | None
    seed: int | None
    settings: dict  # target, reduction, probe, pooling, llm_layer, lora
    summary: dict
    rows: list[dict]
    counts: dict
    source: str = ""  # the dir relative to the common root of all inputs


@dataclass
class RunSet:
    runs: list[Run]
    root: Path
    failed: list[tuple[str, str]] = field(default_factory=list)  # (dir, error)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (dir, error) of a broken results.json
    dropped_rows: list[tuple[str, int, str]] = field(default_factory=list)  # (dir, rows dropped, why)

    def of(self, experiment: str) -> list[Run]:
        return [r for r in self.runs if r.experiment == experiment]


def _expand(spec: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    if not matches and not glob.has_magic(spec):
        raise UserError(f"report.runs: {spec} does not exist")
    return [Path(m) for m in matches]


def _run_dirs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Dirs with results.json, and dirs with only failed.json, under the given paths."""
    done, failed = set(), set()
    for path in paths:
        if path.is_file() and path.name in (RESULTS, FAILED):
            path = path.parent
        if not path.is_dir():
            continue
        done.update(p.parent for p in path.rglob(RESULTS))
        failed.update(p.parent for p in path.rglob(FAILED))
    return sorted(done), sorted(failed - done)


def _settings(run_dir: Path) -> tuple[dict, dict, int | None]:
    """(model section, settings, seed) from the run's composed config; empty when it has none."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return {}, {}, None
    cfg = OmegaConf.load(config_file)

    def plain(key):
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    model = {"family": plain("model.family"), "modality": plain("model.modality"), "lora": plain("model.lora")}
    settings = {"target": plain("target.name"), "reduction": plain("target.reduction"),
                "probe": plain("probe.name"), "pooling": plain("hook.pooling"),
                "llm_layer": plain("hook.llm_layer"), "lora": model["lora"]}
    seed = plain("seed")
    return model, settings, seed if isinstance(seed, int) else None


def _model_label(name: str, lora: str | None) -> str:
    if not lora:
        return name
    from mcollapse.models.lora import adapter_digest

    if Path(lora).expanduser().is_dir():
        return f"{name}+lora-{adapter_digest(lora)}"
    return f"{name}+lora({lora})"  # the adapter has moved: still told apart from the base model


REQUIRED = {"experiment": str, "model": str, "dataset": str}
OPTIONAL = {"summary": dict, "rows": list, "counts": dict}


def _read_results(path: Path) -> dict:
    """A results.json with the fields a report reads; valid JSON without them is unreadable too."""
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict):
        raise ValueError(f"{RESULTS} holds a {type(payload).__name__}, not an object")
    missing = [name for name in REQUIRED if name not in payload]
    if missing:
        raise ValueError(f"{RESULTS} lacks {', '.join(missing)}")
    wrong = [name for name, kind in {**REQUIRED, **OPTIONAL}.items()
             if name in payload and not isinstance(payload[name], kind)]
    if wrong:
        raise ValueError(f"{RESULTS} has the wrong type for {', '.join(wrong)}")
    return payload


ROW_FIELDS = ("hook", "info_type", "metric", "value")  # what the tables read from every row


def _row_problem(row) -> str | None:
    """Why a results row cannot be read into a table, or None."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    missing = [name for name in ROW_FIELDS if name not in row]
    if missing:
        return f"no {', '.join(missing)}"
    value = row["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return f"value {value!r} is not a number"
    return None


def _usable_rows(rows: list) -> tuple[list[dict], Counter]:
    """The rows a table can read, and why the others were dropped (counted, so the report says so)."""
    kept, dropped = [], Counter()
    for row in rows:
        problem = _row_problem(row)
        if problem is None:
            kept.append(row)
        else:
            dropped[problem] += 1
    return kept, dropped


def _describe_drops(dropped: Counter) -> str:
    return "; ".join(f"{n} with {why}" if why.startswith("no ") else f"{n}: {why}"
                     for why, n in dropped.most_common(3))


def load_runs(specs: list[str] | str) -> RunSet:
    """Every finished run under `specs` (dirs, run dirs or globs), the failed ones listed apart."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise UserError("report.runs is empty: give a multirun dir, run dirs or a glob")
    paths = [p for spec in specs for p in _expand(str(spec))]
    done, failed_dirs = _run_dirs(paths)
    anchors = [p.resolve() for p in paths]
    root = Path(os.path.commonpath(anchors)) if anchors else Path.cwd()
    if root.is_file():
        root = root.parent
    runs, unreadable, dropped_rows = [], [], []
    for run_dir in done:
        try:
            payload = _read_results(run_dir / RESULTS)
            experiment = payload["experiment"]
        except (OSError, ValueError) as err:
            unreadable.append((run_dir, f"{type(err).__name__}: {err}"))
            continue
        if experiment in OWN_EXPERIMENTS:
            continue
        rows, dropped = _usable_rows(payload.get("rows", []))
        if dropped:
            dropped_rows.append((_relative(run_dir, root), sum(dropped.values()), _describe_drops(dropped)))
        model, settings, seed = _settings(run_dir)
        runs.append(Run(
            path=run_dir, experiment=experiment, model=_model_label(payload["model"], model.get("lora")),
            dataset=payload["dataset"], family=model.get("family"), modality=model.get("modality"),
            seed=seed, settings=settings,
            summary=payload.get("summary", {}), rows=rows, counts=payload.get("counts", {}),
            source=_relative(run_dir, root)))
    failed = []
    for run_dir in failed_dirs:
        try:
            error = json.loads((run_dir / FAILED).read_text()).get("error", "")
        except (OSError, ValueError) as err:
            error = f"unreadable {FAILED}: {err}"
        failed.append((_relative(run_dir, root), error))
    return RunSet(runs, root, failed, [(_relative(path, root), e) for path, e in unreadable], dropped_rows)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root)) or "."
    except ValueError:
        return str(path.resolve())
