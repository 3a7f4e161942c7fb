"""`experiment=cache`: list the store's entries by kind, verify them (every file opened), or prune
them (dry run first; an entry another run holds the lock of is left alone).

Loads no model and touches no entry unless `cache.action=prune cache.dry_run=false`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table as RichTable

from mcollapse.errors import ChecksFailed, UserError
from mcollapse.report.output import RunRecorder
from mcollapse.store.inventory import Item, inventory, lock_file, problems, remove
from mcollapse.store.kinds import KINDS
from mcollapse.store.lock import ReadOnlyStore, is_read_only_error, lock

log = logging.getLogger(__name__)

ACTIONS = ("list", "verify", "prune")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _selected(cfg) -> list[Item]:
    settings = cfg.cache
    kinds = [str(settings.kind)] if settings.kind else None
    if kinds and kinds[0] not in KINDS:
        raise UserError(f"cache.kind {settings.kind!r} is not one of {', '.join(KINDS)}")
    items = inventory(Path(cfg.paths.cache_dir), Path(cfg.paths.data_root), kinds)
    if settings.model:
        items = [i for i in items if i.model == str(settings.model)]
    if settings.older_than_days is not None:
        if float(settings.older_than_days) < 0:
            raise UserError(f"cache.older_than_days must be at least 0, got {settings.older_than_days}")
        items = [i for i in items if i.age_days > float(settings.older_than_days)]
    return items


def _print(rows: list[dict], title: str, extra: str | None = None) -> None:
    table = RichTable(title=title)
    for column in ("kind", "key", "model", "dataset", "size", "date", *([extra] if extra else [])):
        table.add_column(column)
    for row in rows:
        table.add_row(row["kind"], row["key"], str(row["model"] or "–"), str(row["dataset"] or "–"),
                      _megabytes(row["size_bytes"]), row["date"], *([str(row[extra])] if extra else []))
    Console(width=160).print(table)


def _verify(items: list[Item], rows: list[dict]) -> list[str]:
    """Open every file of every entry; each broken entry gets a log line (and its row) naming it."""
    failing = []
    for item, row in zip(items, rows):
        row["problems"] = "; ".join(problems(item)) or "ok"
        if row["problems"] != "ok":
            failing.append(f"{item.kind}/{item.key}: {row['problems']}")
            log.error("cache entry %s/%s (%s): %s", item.kind, item.key, item.path, row["problems"])
    return failing


def _prune(items: list[Item], rows: list[dict], dry_run: bool, cache_dir: Path) -> int:
    """Delete each entry under its lock; an entry whose lock another run holds is left, and said so.
    Returns how many were in use."""
    for row in rows:
        row["pruned"] = row["in_use"] = False
    if dry_run:
        return 0
    for item, row in zip(items, rows):
        try:
            with lock(lock_file(item), f"{item.kind} {item.key}", timeout=0):
                remove(item)
            row["pruned"] = True
        except TimeoutError:
            row["in_use"] = True
            log.warning("%s/%s is in use by another run (it holds %s): not pruned; prune again once it ends",
                        item.kind, item.key, lock_file(item))
        except (OSError, ReadOnlyStore) as error:
            if isinstance(error, OSError) and not is_read_only_error(error):
                raise
            deleted = sum(r["pruned"] for r in rows)
            raise UserError(f"cache directory {cache_dir} is read-only: cannot prune {item.path} "
                            f"({deleted} entries deleted before it)") from None
    return sum(row["in_use"] for row in rows)


def run(cfg, run_dir: Path) -> dict:
    settings = cfg.cache
    action = str(settings.action)
    if action not in ACTIONS:
        raise UserError(f"cache.action must be one of {', '.join(ACTIONS)}, got {action!r}")
    rec = RunRecorder(run_dir, {"experiment": "cache", "model": None, "dataset": None},
                      extra_meta={"config": OmegaConf.to_container(settings, resolve=True)})
    items = _selected(cfg)
    rows = [item.as_row() for item in items]
    summary: dict = {"action": action, "cache_dir": str(cfg.paths.cache_dir), "n_entries": len(items),
                     "size_bytes": sum(i.size_bytes for i in items),
                     "by_kind": {k: sum(i.kind == k for i in items) for k in KINDS if any(i.kind == k for i in items)}}
    failing = []
    if action == "verify":
        failing = _verify(items, rows)
        summary["n_problems"] = len(failing)
    elif action == "prune":
        summary["dry_run"] = bool(settings.dry_run)
        if not settings.kind and not settings.model and settings.older_than_days is None:
            raise UserError("cache.action=prune needs cache.kind, cache.model or cache.older_than_days "
                            "(to empty the whole cache, delete its directory)")
        summary["n_in_use"] = _prune(items, rows, bool(settings.dry_run), Path(cfg.paths.cache_dir))
    rec.write([rec.row("-", "-", None, "size_bytes", row["size_bytes"], **{k: v for k, v in row.items()
                                                                           if k != "size_bytes"}) for row in rows],
              summary)
    verb = {"list": "", "verify": " (verified)", "prune": " pruned" if not settings.dry_run else " to prune (dry run)"}
    _print(rows, f"cache {cfg.paths.cache_dir}: {len(items)} entries, {_megabytes(summary['size_bytes'])}"
                 f"{verb[action]}", "problems" if action == "verify" else None)
    if action == "prune" and settings.dry_run and items:
        print(f"dry run: {len(items)} entries ({_megabytes(summary['size_bytes'])}) would be deleted; "
              "add cache.dry_run=false to delete them")
    if action == "prune" and summary["n_in_use"]:
        print(f"{summary['n_in_use']} entries in use by another run were not pruned; prune again once it ends")
    if failing:
        raise ChecksFailed(f"{len(failing)} of {len(items)} cache entries have problems, first {failing[0]}")
    return summary
