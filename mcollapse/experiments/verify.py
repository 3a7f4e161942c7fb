"""Check run results against expected values: `mcollapse experiment=verify report.runs=<dir>
[verify.expected=paper | <your file>.yaml]`. Prints a pass/fail table, writes it to the run dir,
and exits non-zero when any check fails (a missing or ambiguous row counts as a failure unless
`verify.allow_missing=true`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table as RichTable

from mcollapse.errors import ChecksFailed
from mcollapse.experiments.report import runs_from
from mcollapse.report.expectations import FAIL, MISSING, PASS, evaluate, expected_file, load_expectations
from mcollapse.report.output import RunRecorder
from mcollapse.report.paper_tables import paper_tables

log = logging.getLogger(__name__)

STYLE = {PASS: "green", MISSING: "yellow"}


def _config_dir() -> Path:
    from mcollapse.cli import config_dir

    return Path(config_dir())


def _write_csv(outcomes, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["check", "status", "actual", "wanted", "table", "column", "where", "source", "detail"])
        for o in outcomes:
            writer.writerow([o.check.name, o.status, "" if o.actual is None else repr(o.actual), o.check.wanted(),
                             o.check.table, o.check.column, OmegaConf.to_yaml(o.check.where).strip()
                             .replace("\n", "; "), o.source, o.detail])


def _print(outcomes, title: str) -> None:
    table = RichTable(title=title)
    for column in ("check", "status", "actual", "wanted", "source / detail"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        style = STYLE.get(o.status, "red")
        actual = "–" if o.actual is None else f"{o.actual:.4g}"
        table.add_row(o.check.name, f"[{style}]{o.status}[/{style}]", actual, o.check.wanted(),
                      o.detail if o.status != PASS else o.source)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for o in outcomes:  # one unwrapped line per failure, for logs and grep
        if o.failed:
            actual = "–" if o.actual is None else f"{o.actual:.6g}"
            console.print(f"{o.status}: {o.check.name}: {actual}, wanted {o.check.wanted()}; {o.detail or o.source}",
                          soft_wrap=True, markup=False, highlight=False)


def run(cfg, run_dir: Path) -> dict:
    rec = RunRecorder(run_dir, {"experiment": "verify", "model": None, "dataset": None},
                      extra_meta={"config": OmegaConf.to_container(cfg.report, resolve=True)
                                  | {"verify": OmegaConf.to_container(cfg.verify, resolve=True)}})
    path = expected_file(cfg.verify.expected, _config_dir())
    expectations = load_expectations(path)
    runs = runs_from(cfg)
    tables = {t.name: t for t in paper_tables(runs)}
    outcomes = evaluate(expectations.checks, tables)
    allow_missing = cfg.verify.allow_missing
    failing = [o for o in outcomes if o.failed and not (allow_missing and o.status == MISSING)]
    counts = {status: sum(o.status == status for o in outcomes) for status in {o.status for o in outcomes}}
    rec.counts.update({"n_checks": len(outcomes), **counts, "n_failing": len(failing), "n_runs": len(runs.runs),
                       "n_unreadable": len(runs.unreadable), "n_rows_dropped": sum(n for _, n, _ in runs.dropped_rows)})
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(outcomes, run_dir / "verify.csv")
    rows = [rec.row("-", "-", None, o.check.name, o.actual, status=o.status, wanted=o.check.wanted(),
                    table=o.check.table, column=o.check.column, source=o.source, detail=o.detail) for o in outcomes]
    summary = {"expected": str(path), "name": expectations.name, "runs_root": str(runs.root),
               "n_checks": len(outcomes), "by_status": counts, "n_failing": len(failing),
               "allow_missing": allow_missing, "passed": not failing, "unreadable": runs.unreadable,
               "dropped_rows": runs.dropped_rows}
    rec.write(rows, summary)
    _print(outcomes, f"verify: {expectations.name} ({len(outcomes)} checks) against {runs.root}")
    checked = sum(o.status in (PASS, FAIL) for o in outcomes)
    if not checked:
        raise ChecksFailed(f"none of the {len(outcomes)} checks of {expectations.name} found its row in these runs "
                           "(see the settings each check asks for in its 'where')")
    if failing:
        tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        raise ChecksFailed(f"{len(failing)} of {len(outcomes)} checks failed ({tally}); see {run_dir / 'verify.csv'}")
    log.info("%d checks passed%s", counts.get(PASS, 0),
             f", {counts[MISSING]} missing (allowed)" if counts.get(MISSING) else "")
    return summary
