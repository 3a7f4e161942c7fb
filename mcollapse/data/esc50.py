"""ESC-50: environmental sounds, labelled by `meta/esc50.csv`; the sounds have no text."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from mcollapse.data.base import Record, media_problem
from mcollapse.errors import DataError

LAYOUT = (
    "<root>/meta/esc50.csv (columns filename,fold,target,category,esc10,src_file,take) "
    "and <root>/audio/<filename>"
)
META_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def load_part(root: Path) -> tuple[list[Record], Counter]:
    """Records for every meta row whose audio file exists and is non-empty."""
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataError(f"{meta} not found; expected {LAYOUT}")
    with meta.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in ("filename", "fold", "category") if c not in columns]
        if missing:
            raise DataError(f"{meta} lacks column(s) {', '.join(missing)}; expected {LAYOUT}")
        rows = list(reader)
    skipped: Counter = Counter()
    records: list[Record] = []
    for row in rows:
        filename = (row.get("filename") or "").strip()
        category = (row.get("category") or "").strip()
        fold = (row.get("fold") or "").strip()
        if not filename or not category or not fold.isdigit() or Path(filename).name != filename:
            skipped["malformed meta row"] += 1
            continue
        path = root / "audio" / filename
        problem = media_problem(path, "audio")
        if problem:
            skipped[problem] += 1
            continue
        fields = {"sound_class": category, "fold": fold}
        records.append(Record(Path(filename).stem, path.resolve(), "audio", None, fields))
    return records, skipped
