"""What the store holds: entries by kind with model, dataset, size and date; checks; pruning.

Read-only except `remove`; used by `experiment=cache`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mcollapse.store import digest
from mcollapse.store.atomic import TMP_PREFIX
from mcollapse.store.checked import Unreadable, check_tree, read_json_object, read_npz_member
from mcollapse.store.kinds import KINDS, Kind
from mcollapse.store.shards import ENTRY_FILE, SHARD_PATTERN

_ENTRY_JSON = "entry.json"
_SEQUENCE_KIND = "adapter_sequences"


@dataclass
class Item:
    kind: str
    key: str
    path: Path
    model: str | None
    dataset: str | None
    size_bytes: int
    modified: float  # seconds since the epoch
    record: dict = field(default_factory=dict)  # the entry's own description, when it has one

    @property
    def age_days(self) -> float:
        return (time.time() - self.modified) / 86400

    def as_row(self) -> dict:
        return {"kind": self.kind, "key": self.key, "model": self.model, "dataset": self.dataset,
                "size_bytes": self.size_bytes,
                "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified)), "path": str(self.path)}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _modified(path: Path) -> float:
    times = [path.stat().st_mtime] + ([p.stat().st_mtime for p in path.rglob("*")] if path.is_dir() else [])
    return max(times)


def _read_json(path: Path) -> dict:
    """An entry's own record, or {} (absent or unreadable: `problems` names it)."""
    try:
        return read_json_object(path)
    except (Unreadable, OSError):
        return {}


def _dataset_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("name")
    return value if isinstance(value, str) else None


def _generated_marker() -> str:
    from mcollapse.data.generators import MARKER

    return MARKER


def _entries(kind: Kind, root: Path):
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.name.endswith(".lock"):
            continue
        if (kind.layout == "dir") != path.is_dir():
            continue
        if kind.name == "datasets" and not (path / _generated_marker()).is_file():
            continue
        found.append(path)
    return found


def _describe(kind: Kind, path: Path) -> tuple[str | None, str | None, dict]:
    """(model, dataset, recorded description) of one entry, from what it recorded about itself."""
    if kind.layout == "dir":
        record = _read_json(path / _ENTRY_JSON)
        fields = record.get("key_fields") or record.get("fields") or {}
        if kind.name == "checkpoints":
            return path.name.rsplit("-", 1)[0], None, {}
        if kind.name == "datasets":
            return None, path.name, _read_json(path / _generated_marker())
        return fields.get("model"), _dataset_name(fields.get("dataset")), record
    if path.suffix == ".json":
        record = _read_json(path)
        return record.get("model"), _dataset_name(record.get("dataset")), record
    if path.suffix == ".npz":
        try:
            stored = read_npz_member(path, "meta_json")
            meta = json.loads(str(stored)) if stored is not None else {}
        except (Unreadable, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        return meta.get("model"), _dataset_name(meta.get("dataset")), meta
    return None, None, {}


def inventory(cache_dir: Path, data_root: Path | None = None, kinds: list[str] | None = None) -> list[Item]:
    """Every entry of the wanted kinds (default: all). Passes whose record names only the adapter
    sequences they ran on take their model and dataset from that sequences entry."""
    items = []
    bases = {"cache": Path(cache_dir), "data": Path(data_root) if data_root else None}
    for kind in KINDS.values():
        base = bases[kind.base]
        if base is None or (kinds and kind.name not in kinds):
            continue
        for path in _entries(kind, base / kind.directory):
            model, dataset, record = _describe(kind, path)
            key = path.stem if kind.layout == "file" else path.name
            items.append(Item(kind.name, key, path, model, dataset, _size(path), _modified(path), record))
    if kinds and "sequences" not in kinds:
        sequences = {i.key: i for i in inventory(cache_dir, kinds=["sequences"])}
    else:
        sequences = {i.key: i for i in items if i.kind == "sequences"}
    for item in items:
        fields = item.record.get("fields") or {}
        source = str(fields.get("sequences") or "").split("+")[0]
        if item.model is None and source in sequences:
            item.model, item.dataset = sequences[source].model, sequences[source].dataset
    return items


_SHARDED_KINDS = ("gradients", "ablation", "msswap", "gmi_scores", "skip")


def problems(item: Item) -> list[str]:
    """What is wrong with an entry: files that do not open, missing shards, a key its fields do not
    give. Every file of the entry is opened and read through the store's checked readers."""
    unreadable = check_tree(item.path)
    found = [f"unreadable {_name_in(item, broken.path)}: {broken.reason}" for broken in unreadable]
    fields = item.record.get("key_fields") or item.record.get("fields")
    if item.kind in ("activations", "sequences", "gradients", "ablation", "msswap") and isinstance(fields, dict):
        expected = digest.key({**fields, "kind": _SEQUENCE_KIND} if item.kind == "sequences" else fields)
        if expected != item.key:
            found.append(f"key {item.key} does not match its recorded fields ({expected})")
    if unreadable:
        return found
    if item.kind == "activations":
        found += _activation_problems(item.path)
    elif item.kind in _SHARDED_KINDS:
        found += _shard_problems(item)
    elif item.kind == "modes":
        found += _basis_problems(item.path)
    elif item.kind == "lipschitz_summary":
        missing = [k for k in ("L_mean", "L_p95") if k not in item.record]
        if missing:
            found.append(f"unreadable summary (lacks {', '.join(missing)})")
    elif item.kind == "checkpoints" and not (item.path / "config.json").is_file():
        found.append("no config.json")
    return found


def _name_in(item: Item, path: Path) -> str:
    return path.name if path == item.path else str(path.relative_to(item.path))


def _shard_problems(item: Item) -> list[str]:
    """Shards a pass's entry.json counts but the directory lacks. A directory with no shards and no
    count is not a pass (ablation keeps its fitted constants in one)."""
    n = item.record.get("n_batches")
    if n is None:
        return [f"no {ENTRY_FILE} recording its batch count"] if any(item.path.glob("batch-*.npz")) else []
    return [f"missing {SHARD_PATTERN.format(b)}" for b in range(n)
            if not (item.path / SHARD_PATTERN.format(b)).is_file()]


def _basis_problems(path: Path) -> list[str]:
    from mcollapse.analysis.modes import load_basis
    from mcollapse.errors import UserError

    try:
        load_basis(path)
    except UserError as error:
        return [str(error)]
    return []


def _activation_problems(path: Path) -> list[str]:
    import h5py

    final = path / "activations.h5"
    if not final.is_file():
        shards = sorted((path / "shards").glob("shard-*.h5")) if (path / "shards").is_dir() else []
        return [f"incomplete ({len(shards)} shards; the next run resumes it)"]
    try:
        with h5py.File(final, "r", locking=False) as f:
            n = len(f["ids"])
            for hook in json.loads(f.attrs["hooks"]):
                if f["vectors"][hook].shape[0] != n:
                    return [f"hook {hook} has {f['vectors'][hook].shape[0]} rows for {n} ids"]
    except (OSError, KeyError, ValueError) as error:
        return [f"unreadable activations.h5: {error}"]
    return []


_BUILT_KINDS = ("checkpoints", "datasets", "variants")  # built by store.build.build_once


def lock_file(item: Item) -> Path:
    """The lock its writers hold: build_once's beside a built directory, else the entry's own."""
    if item.kind in _BUILT_KINDS:
        return item.path.with_name(f".{item.path.name}.lock")
    if item.path.is_file():
        return item.path.with_name(f"{item.key}.lock")
    return item.path / ".lock"


def remove(item: Item) -> None:
    """Delete an entry and its lock file (a file entry's lock sits beside it)."""
    if item.path.is_dir():
        moved = item.path.with_name(f"{TMP_PREFIX}{item.path.name}")  # readers never trust a .tmp- name
        item.path.rename(moved)
        shutil.rmtree(moved, ignore_errors=True)
    else:
        item.path.unlink(missing_ok=True)
        item.path.with_name(f"{item.key}.lock").unlink(missing_ok=True)
