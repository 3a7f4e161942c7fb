"""Expected values with tolerances, checked against the report's tables.

An expected-value file (YAML) holds `checks` (one value each) and `grids` (a row of values per
table row, e.g. Table 5's four hooks, with a tolerance for the grid or per column); every check
names a table, the row (`where`: column =
value), a column, and either `expected` with `tol` (absolute) or `rel_tol`, or bounds `min` /
`max`. A check whose row is absent is `missing`; one whose row is not unique is `ambiguous`;
both count as failures unless missing rows are allowed, so a check never passes by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mcollapse.errors import UserError
from mcollapse.report.tables import Table

PASS, FAIL, MISSING, AMBIGUOUS = "pass", "FAIL", "missing", "ambiguous"


@dataclass
class Check:
    name: str
    table: str
    where: dict
    column: str
    expected: float | None = None
    tol: float | None = None
    rel_tol: float | None = None
    min: float | None = None
    max: float | None = None
    note: str = ""

    def bounds(self) -> tuple[float, float]:
        low, high = -math.inf, math.inf
        if self.expected is not None:
            slack = self.tol if self.tol is not None else abs(self.expected) * self.rel_tol
            low, high = self.expected - slack, self.expected + slack
        if self.min is not None:
            low = max(low, self.min)
        if self.max is not None:
            high = min(high, self.max)
        return low, high

    def wanted(self) -> str:
        if self.expected is not None:
            spread = f"± {self.tol:g}" if self.tol is not None else f"± {100 * self.rel_tol:g} %"
            text = f"{self.expected:g} {spread}"
        else:
            text = ""
        if self.min is not None:
            text += f"{' and ' if text else ''}≥ {self.min:g}"
        if self.max is not None:
            text += f"{' and ' if text else ''}≤ {self.max:g}"
        return text


@dataclass
class Outcome:
    check: Check
    status: str
    actual: float | None = None
    source: str = ""
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status != PASS


@dataclass
class Expectations:
    name: str
    description: str
    checks: list[Check] = field(default_factory=list)


def expected_file(spec: str, config_dir: Path) -> Path:
    """A path to a YAML file, or the name of one under conf/expected/."""
    candidate = Path(spec).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"verify.expected: {spec} does not exist")
        return candidate
    shipped = config_dir / "expected" / f"{spec}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in (config_dir / "expected").glob("*.yaml"))
        raise UserError(f"verify.expected: no expected-value file '{spec}' (shipped: {', '.join(names)}; "
                        "or give a path to your own YAML)")
    return shipped


def _list(value, origin: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{origin}: must be a list, got {type(value).__name__} {value!r}")
    return value


def _mapping(value, origin: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{origin}: must be a mapping (key: value), got {type(value).__name__} {value!r}")
    return value


def _number_field(entry: dict, key: str, origin: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{origin}: '{key}' must be a number, got {value!r}") from None


def _check(entry, where_default: dict, origin: str) -> Check:
    entry = _mapping(entry, origin)
    known = {"name", "table", "where", "column", "expected", "tol", "rel_tol", "min", "max", "note"}
    unknown = set(entry) - known
    if unknown:
        raise UserError(f"{origin}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                        f"(allowed: {', '.join(sorted(known))})")
    for key in ("name", "table", "column"):
        if not entry.get(key):
            raise UserError(f"{origin}: a check needs '{key}'")
    check = Check(name=str(entry["name"]), table=str(entry["table"]),
                  where={**where_default, **_mapping(entry.get("where"), f"{origin} where")},
                  column=str(entry["column"]),
                  **{k: _number_field(entry, k, origin) for k in ("expected", "tol", "rel_tol", "min", "max")},
                  note=str(entry.get("note", "")))
    if check.expected is None and check.min is None and check.max is None:
        raise UserError(f"{origin}: check '{check.name}' needs 'expected' (with 'tol' or 'rel_tol') or 'min'/'max'")
    if check.expected is not None and (check.tol is None) == (check.rel_tol is None):
        raise UserError(f"{origin}: check '{check.name}' needs exactly one of 'tol' and 'rel_tol'")
    return check


def _grid_checks(grid, origin: str) -> list[Check]:
    """The checks of one grid: a row of expected values per table row, one per column."""
    grid = _mapping(grid, origin)
    if not grid.get("table"):
        raise UserError(f"{origin}: a grid needs 'table'")
    columns = _list(grid.get("columns"), f"{origin} columns")
    where_default = _mapping(grid.get("where"), f"{origin} where")
    checks = []
    for r, row in enumerate(_list(grid.get("rows"), f"{origin} rows")):
        row = _mapping(row, f"{origin} rows[{r}]")
        values = _list(row.get("expected"), f"{origin} rows[{r}] expected")
        if len(values) != len(columns):
            raise UserError(f"{origin} rows[{r}]: {len(values)} values for {len(columns)} columns")
        where = {k: v for k, v in row.items() if k not in ("expected", "name")}
        label = row.get("name") or "/".join(str(v) for v in where.values())
        for column, value in zip(columns, values):
            if value is None:
                continue
            entry = {"name": f"{grid.get('name', grid['table'])}: {label} {column}", "table": grid["table"],
                     "where": where, "column": column, "expected": value, "note": grid.get("note", "")}
            for key in ("tol", "rel_tol"):  # one value for the grid, or one per column
                value = grid.get(key)
                if isinstance(value, dict):
                    value = value.get(column)
                if value is not None:
                    entry[key] = value
            checks.append(_check(entry, where_default, f"{origin} rows[{r}]"))
    return checks


def load_expectations(path: Path) -> Expectations:
    """Every check of an expected-value file; a file of the wrong shape is one line saying where."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - any YAML problem is the user's file
        raise UserError(f"{path}: not a readable YAML file ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with 'checks' and/or 'grids'")
    checks = []
    for g, grid in enumerate(_list(raw.get("grids"), f"{path.name} grids")):
        checks += _grid_checks(grid, f"{path.name} grids[{g}]")
    checks += [_check(entry, {}, f"{path.name} checks[{i}]")
               for i, entry in enumerate(_list(raw.get("checks"), f"{path.name} checks"))]
    if not checks:
        raise UserError(f"{path}: no checks")
    return Expectations(str(raw.get("name", path.stem)), str(raw.get("description", "")), checks)


def evaluate(checks: list[Check], tables: dict[str, Table]) -> list[Outcome]:
    outcomes = []
    for check in checks:
        table = tables.get(check.table)
        if table is None:
            raise UserError(f"check '{check.name}': no table '{check.table}' (tables: {', '.join(sorted(tables))})")
        if check.column not in table.columns:
            raise UserError(f"check '{check.name}': table {check.table} has no column '{check.column}'")
        rows = table.select(check.where)
        values = {_number(r.get(check.column)) for r in rows}
        if not rows or values == {None}:
            outcomes.append(Outcome(check, MISSING, detail="no row with " + _describe(check.where)))
            continue
        if len(values) > 1:
            varying = [c for c in table.columns  # in table order: the identifying columns come first
                       if c not in (check.column, "source") and len({str(r.get(c)) for r in rows}) > 1]
            outcomes.append(Outcome(check, AMBIGUOUS, source=";".join(r.get("source", "") for r in rows),
                                    detail=f"{len(rows)} rows differ; add {', '.join(varying[:4])} to 'where'"))
            continue
        actual = values.pop()
        low, high = check.bounds()
        ok = actual is not None and low <= actual <= high
        outcomes.append(Outcome(check, PASS if ok else FAIL, actual, rows[0].get("source", ""),
                                "" if ok else f"outside [{low:.4g}, {high:.4g}]"))
    return outcomes


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _describe(where: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items()) or "(any row)"
