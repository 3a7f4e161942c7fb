"""A report table: rows of plain values written as CSV (the data) and Markdown (for reading).

Mean/std column pairs are shown as "m ± s" in Markdown and kept apart in the CSV, so a value read
back from the CSV is the number itself, never a rounded string.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from mcollapse.store.atomic import atomic_path


@dataclass
class Table:
    name: str  # file stem: <name>.csv / <name>.md
    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    caption: str = ""
    pairs: dict[str, str] = field(default_factory=dict)  # mean column -> its std column
    digits: dict[str, int] = field(default_factory=dict)  # column -> decimals (default: 4 significant)
    missing: list[str] = field(default_factory=list)  # what could not be filled, and why

    def select(self, where: dict) -> list[dict]:
        """Rows whose columns equal every `where` value (compared as strings, so 42 matches "42")."""
        return [r for r in self.rows if all(str(r.get(k)) == str(v) for k, v in where.items())]

    def write_csv(self, path: Path) -> None:
        with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: _csv_value(row.get(c)) for c in self.columns})

    def markdown(self) -> str:
        shown = [c for c in self.columns if c not in self.pairs.values()]
        lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
        for row in self.rows:
            cells = []
            for column in shown:
                value = self.format(column, row.get(column))
                if column in self.pairs and row.get(self.pairs[column]) is not None and row.get(column) is not None:
                    value += " ± " + self.format(column, row.get(self.pairs[column]))
                cells.append(value.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def format(self, column: str, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if column in self.digits:
                return f"{value:.{self.digits[column]}f}"
            return f"{value:.4g}"
        return str(value)

    def write(self, out_dir: Path) -> dict:
        """<name>.csv and <name>.md (title, caption, table, what is missing); returns the file names."""
        self.write_csv(out_dir / f"{self.name}.csv")
        parts = [f"# {self.title}", ""]
        if self.caption:
            parts += [self.caption, ""]
        parts.append(self.markdown() if self.rows else "_no rows: see below_")
        if self.missing:
            parts += ["", "Missing:", *[f"- {m}" for m in self.missing]]
        (out_dir / f"{self.name}.md").write_text("\n".join(parts) + "\n")
        return {"csv": f"{self.name}.csv", "md": f"{self.name}.md"}


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value
