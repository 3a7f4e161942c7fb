"""Checked opens: every stored file is read through one function per format that turns any way a
file can be broken (truncated, garbage, wrong format) into `Unreadable`.

Readers catch `Unreadable` alone, quarantine the file (`entry.quarantine`) and compute it again, so
a broken entry costs one warning instead of a traceback on every re-run. `check_file` /
`check_tree` open every file of an entry for `experiment=cache cache.action=verify`; with
`thorough=False` they only look at what a truncation breaks (cheap enough before every model load).
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mcollapse.store.atomic import TMP_PREFIX

# what numpy, zipfile, h5py, safetensors and torch raise for a file that is not what it should be
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, IndexError, AttributeError, RuntimeError,
                UnicodeDecodeError, zipfile.BadZipFile, zlib.error, struct.error)
_SAFETENSORS_HEADER_MAX = 100 << 20


class Unreadable(Exception):
    """A stored file that cannot be read back; `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def _why(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _checked(path: Path, read: Callable[[Path], Any]) -> Any:
    try:
        return read(Path(path))
    except Unreadable:
        raise
    except (FileNotFoundError, PermissionError):
        raise  # absent, or not ours to read: nothing is wrong with the file itself
    except _READ_ERRORS as error:
        raise Unreadable(path, _why(error)) from error


def read_json(path: Path) -> Any:
    return _checked(path, lambda p: json.loads(p.read_text(encoding="utf-8")))


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (every record the store writes is one)."""
    found = read_json(path)
    if not isinstance(found, dict):
        raise Unreadable(path, f"holds a JSON {type(found).__name__}, not an object")
    return found


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (each member's CRC is checked as it is read)."""
    def read(p: Path) -> dict[str, np.ndarray]:
        with np.load(p, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    return _checked(path, read)


def read_npz_member(path: Path, name: str) -> np.ndarray | None:
    """One array of an .npz (None when it has none of that name), without reading the others."""
    def read(p: Path) -> np.ndarray | None:
        with np.load(p, allow_pickle=False) as data:
            return data[name] if name in data.files else None

    return _checked(path, read)


def read_npy(path: Path) -> np.ndarray:
    return _checked(path, lambda p: np.load(p, allow_pickle=False))


def check_h5(path: Path, thorough: bool = True) -> None:
    """Open an HDF5 file and (thorough) read every dataset in it."""
    import h5py

    def read(p: Path) -> None:
        with h5py.File(p, "r", locking=False) as f:
            if thorough:
                f.visititems(lambda _, node: node[()] if isinstance(node, h5py.Dataset) else None)

    _checked(path, read)


def check_safetensors(path: Path) -> None:
    """The header parses and its tensors end exactly where the file does (a truncation shows)."""
    def read(p: Path) -> None:
        size = p.stat().st_size
        with open(p, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _SAFETENSORS_HEADER_MAX):
                raise ValueError(f"header of {header_len} bytes in a file of {size}")
            header = json.loads(handle.read(header_len))
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
        if 8 + header_len + max(ends, default=0) != size:
            raise ValueError(f"{size} bytes, its header describes {8 + header_len + max(ends, default=0)}")

    _checked(path, read)


def check_torch_archive(path: Path, thorough: bool = True) -> None:
    """A torch.save file (a zip archive): its directory reads and (thorough) every member's CRC
    matches. Nothing is unpickled."""
    def read(p: Path) -> None:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip() if thorough else None
            if bad is not None:
                raise ValueError(f"member {bad} is corrupt")

    _checked(path, read)


def read_torch(path: Path, **load_options) -> Any:
    """torch.load, after the archive check, with every failure as `Unreadable`."""
    import torch

    check_torch_archive(path)
    return _checked(path, lambda p: torch.load(p, **load_options))


def read_training_state(path: Path, keys: tuple[str, ...], map_location) -> dict:
    """A training checkpoint written by torch.save: a dict holding at least `keys`, or `Unreadable`."""
    state = read_torch(path, map_location=map_location, weights_only=False)
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise Unreadable(path, f"lacks {', '.join(missing)}")
    return state


def check_file(path: Path, thorough: bool = True) -> None:
    """Open `path` by its format (by suffix); raises `Unreadable`. Other formats are not looked into."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        read_json(path)
    elif suffix == ".npz":
        read_npz(path) if thorough else _checked(path, lambda p: zipfile.ZipFile(p).close())
    elif suffix == ".npy":
        read_npy(path)
    elif suffix in (".h5", ".hdf5"):
        check_h5(path, thorough)
    elif suffix == ".safetensors":
        check_safetensors(path)
    elif suffix in (".pt", ".pth"):
        check_torch_archive(path, thorough)


def stored_files(root: Path) -> list[Path]:
    """The files of an entry a reader trusts: not locks, not temporaries of a live writer."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")
                  and not any(part.startswith(TMP_PREFIX) for part in p.relative_to(root).parts))


def check_tree(root: Path, thorough: bool = True) -> list[Unreadable]:
    """Every unreadable file of a file or directory entry."""
    found = []
    for path in stored_files(root):
        try:
            check_file(path, thorough)
        except Unreadable as broken:
            found.append(broken)
    return found
