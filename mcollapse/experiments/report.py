"""The paper's tables and figures from finished run dirs, with a one-page `report.md` linking them.

`mcollapse experiment=report report.runs=<multirun dir | run dirs | globs>`: reads every run's
results (no model is loaded), writes each table as CSV + Markdown, Fig. 1 and Fig. 2 as PNG, and
lists what is missing (tables without runs, rows without a partner run, failed jobs) instead of
filling it in.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table as RichTable

from mcollapse.errors import UserError
from mcollapse.report.lens_tables import lens_tables
from mcollapse.report.output import RunRecorder
from mcollapse.report.paper_figures import mode_alignment_grid, probe_trajectories
from mcollapse.report.paper_tables import paper_tables
from mcollapse.report.runs import RESULTS, RunSet, load_runs
from mcollapse.report.tables import Table

log = logging.getLogger(__name__)

FIGURES = {"fig1_probe_trajectories.png": "Probe accuracy along the path to the decoder (Fig. 1)",
           "fig2_mode_alignment.png": "Mode alignment profiles (Fig. 2)"}


def runs_from(cfg) -> RunSet:
    if OmegaConf.is_missing(cfg.report, "runs") or not cfg.report.runs:
        raise UserError("say which runs to read: report.runs=<multirun dir> (or a run dir, a glob, or a list)")
    specs = cfg.report.runs
    specs = [str(s) for s in specs] if OmegaConf.is_list(specs) else [str(specs)]
    runs = load_runs(specs)
    if not runs.runs and runs.unreadable:
        where, error = runs.unreadable[0]
        more = f" (and {len(runs.unreadable) - 1} more broken)" if len(runs.unreadable) > 1 else ""
        raise UserError(f"no readable run under {', '.join(specs)}: {runs.root / where / RESULTS} is broken "
                        f"({error}){more}")
    if not runs.runs:
        raise UserError(f"no finished run (a dir with results.json) under {', '.join(specs)}")
    _warn_of_problems(runs)
    return runs


def _warn_of_problems(runs: RunSet) -> None:
    """What the tables will lack, said when the runs are read (report.md and the summary list it too)."""
    for where, error in runs.unreadable:
        log.warning("skipping %s: %s", runs.root / where / RESULTS, error)
    for where, n, why in runs.dropped_rows:
        log.warning("dropped %d row(s) of %s that no table can read (%s)", n, runs.root / where / RESULTS, why)


def build(runs: RunSet, out_dir: Path, inline_rows: int = 15) -> dict:
    """Write the tables, figures and report.md into out_dir; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = paper_tables(runs) + lens_tables(runs)
    files = {t.name: t.write(out_dir) for t in tables}
    probe_rows = next(t.rows for t in tables if t.name == "table5_probes")  # one row per probe group
    figures = {}
    if probe_trajectories(probe_rows, out_dir / "fig1_probe_trajectories.png"):
        figures["fig1_probe_trajectories.png"] = FIGURES["fig1_probe_trajectories.png"]
    if mode_alignment_grid(runs, out_dir / "fig2_mode_alignment.png"):
        figures["fig2_mode_alignment.png"] = FIGURES["fig2_mode_alignment.png"]
    missing = [f"{t.title}: {m}" for t in tables for m in t.missing]
    missing += [f"{name}: no runs to draw it from" for name in FIGURES if name not in figures]
    (out_dir / "report.md").write_text(_markdown(runs, tables, figures, missing, inline_rows))
    return {"root": str(runs.root), "n_runs": len(runs.runs),
            "runs_by_experiment": _count_by_experiment(runs), "failed": runs.failed, "unreadable": runs.unreadable,
            "dropped_rows": runs.dropped_rows,
            "tables": {t.name: {"rows": len(t.rows), "missing": t.missing, **files[t.name]} for t in tables},
            "figures": list(figures), "missing": missing}


def _count_by_experiment(runs: RunSet) -> dict:
    counts: dict[str, int] = {}
    for run in runs.runs:
        counts[run.experiment] = counts.get(run.experiment, 0) + 1
    return dict(sorted(counts.items()))


def _markdown(runs: RunSet, tables: list[Table], figures: dict, missing: list[str], inline_rows: int) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in _count_by_experiment(runs).items())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# mcollapse report", "",
        f"{len(runs.runs)} finished run dirs under `{runs.root}` ({counts}); {len(runs.failed)} failed, "
        f"{len(runs.unreadable)} unreadable; {_dropped_count(runs)} rows dropped. Written {stamp}.", "",
        "Every number sits beside the settings that produced it: `target` is the loss target of decoder "
        "numbers (`content`: the transcript/caption as the answer; `reference`: the earlier code's prompt-token "
        "loss), `probe` the probe preset, `pooling` the pooling; `source` is the run dir it was read from, "
        "relative to the directory above. W1 and mode alignment involve neither a loss nor a probe.", "",
    ]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{title}]({name})" for name, title in figures.items()]
        lines += [""] + [f"![{title}]({name})" for name, title in figures.items()] + [""]
    lines += ["## Tables", ""]
    for table in tables:
        links = f"[{table.name}.md]({table.name}.md), [{table.name}.csv]({table.name}.csv)"
        lines += [f"### {table.title}", "", f"{len(table.rows)} rows: {links}", ""]
        if table.rows and len(table.rows) <= inline_rows:
            lines += [table.markdown(), ""]
    lines += ["## Missing pieces", ""]
    if not (missing or runs.failed or runs.unreadable or runs.dropped_rows):
        lines.append("Nothing: every table and figure has the runs it needs.")
    lines += [f"- {m}" for m in missing]
    lines += [f"- failed job `{d}`: {e}" for d, e in runs.failed]
    lines += [f"- unreadable results `{d}`: {e}" for d, e in runs.unreadable]
    lines += [f"- `{d}`: {n} row(s) dropped that no table can read ({why})" for d, n, why in runs.dropped_rows]
    return "\n".join(lines) + "\n"


def _dropped_count(runs: RunSet) -> int:
    return sum(n for _, n, _ in runs.dropped_rows)


def _print(summary: dict, out_dir: Path) -> None:
    table = RichTable(title=f"report: {summary['n_runs']} runs under {summary['root']}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("missing")
    for name, info in summary["tables"].items():
        table.add_row(name, str(info["rows"]), "; ".join(info["missing"])[:120])
    console = Console()
    console.print(table)
    if summary["failed"]:
        console.print(f"[red]{len(summary['failed'])} failed job(s)[/red], listed in report.md")
    if summary["unreadable"] or summary["dropped_rows"]:
        dropped = sum(n for _, n, _ in summary["dropped_rows"])
        console.print(f"[red]{len(summary['unreadable'])} unreadable results, {dropped} dropped row(s)[/red], "
                      "listed in report.md")
    console.print(f"report: {out_dir / 'report.md'}")


def run(cfg, run_dir: Path) -> dict:
    rec = RunRecorder(run_dir, {"experiment": "report", "model": None, "dataset": None},
                      extra_meta={"config": OmegaConf.to_container(cfg.report, resolve=True)})
    with rec.stage("read_runs"):
        runs = runs_from(cfg)
    with rec.stage("tables_and_figures"):
        summary = build(runs, run_dir, cfg.report.inline_rows)
    rec.counts.update({"n_runs": summary["n_runs"], "n_failed": len(runs.failed),
                       "n_unreadable": len(runs.unreadable), "n_rows_dropped": _dropped_count(runs)})
    rows = [rec.row("-", "-", None, "rows", info["rows"], table=name) for name, info in summary["tables"].items()]
    rec.write(rows, summary)
    _print(summary, run_dir)
    return summary
