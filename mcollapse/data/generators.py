"""Synthetic dataset generators by name, installed atomically into the data directory.

A generator writes real on-disk formats (CREMA-D, ESC-50, COCO, LibriSpeech layouts) so the ordinary loaders
read them. `generate(name, out_dir, options)` writes into a sibling temp dir and renames it to
`out_dir` only when complete, under a file lock: an interrupted generation leaves no partial set,
and concurrent sweep jobs generate once. `out_dir/generated.json` records the generator and its
resolved options; a set written with other options (or an older generator version) is replaced.
A directory without that marker is the user's data and is never touched.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import ModuleType

from mcollapse.errors import DataError, UserError
from mcollapse.store.build import build_once

log = logging.getLogger(__name__)

MARKER = "generated.json"


def _modules() -> dict[str, ModuleType]:
    from mcollapse.data import synthetic_librispeech, synthetic_speech, synthetic_vision

    return {
        "synthetic_speech": synthetic_speech,
        "synthetic_vision": synthetic_vision,
        "synthetic_librispeech": synthetic_librispeech,
    }


def generator(name: str) -> ModuleType:
    """The generator module registered under `name`."""
    modules = _modules()
    if name not in modules:
        raise UserError(f"unknown generator {name!r}; known: {', '.join(modules)}")
    return modules[name]


def resolve_options(name: str, options: dict | None) -> dict:
    """The generator's defaults updated with `options`; unknown keys are a user error."""
    module = generator(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(module.DEFAULT_OPTIONS))
    if unknown:
        raise UserError(
            f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(module.DEFAULT_OPTIONS)}"
        )
    merged = {**module.DEFAULT_OPTIONS, **options}
    try:  # JSON-normal (tuples -> lists), so a marker read back compares equal
        return json.loads(json.dumps(merged))
    except TypeError as exc:
        raise UserError(f"{name} options must be plain values: {exc}") from exc


def read_marker(out_dir: Path) -> dict | None:
    """The marker of a generated set, or None for a missing dir or user data."""
    try:
        return json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stamp(name: str, options: dict) -> dict:
    return {"generator": name, "version": generator(name).VERSION, "options": options}


def is_current(name: str, out_dir: Path, options: dict | None) -> bool:
    """Whether `out_dir` holds a complete set from this generator with these options."""
    marker = read_marker(out_dir)
    return marker is not None and marker == _stamp(name, resolve_options(name, options))


def generate(name: str, out_dir: Path, options: dict | None = None) -> bool:
    """Make `out_dir` hold the named synthetic set; returns whether anything was generated."""
    module = generator(name)
    resolved = resolve_options(name, options)
    stamp = _stamp(name, resolved)
    out_dir = Path(out_dir)

    def current(path: Path) -> bool:
        marker = read_marker(path)
        if marker is None and path.exists():
            raise DataError(
                f"{path} exists but was not written by the {name} generator; "
                "move it away or point paths.data_root elsewhere"
            )
        return marker == stamp

    def write(staging: Path) -> None:
        module.write(staging, resolved)
        (staging / MARKER).write_text(json.dumps(stamp, indent=2, sort_keys=True), encoding="utf-8")

    started = time.perf_counter()
    if not build_once(out_dir, write, current, f"{name} data in {out_dir}"):
        return False
    log.info("generated %s into %s in %.1f s", name, out_dir, time.perf_counter() - started)
    return True
