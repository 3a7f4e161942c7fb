"""Datasets as records (ids, paths, text, raw label fields), media loaded on demand.

`load_records(dataset_cfg)` reads every part of a dataset config with the loader for its
`format` (librispeech, cremad, esc50, coco), generating synthetic sets first when the config
names a generator. A generated dataset's part roots must be `<dir>/<subdir>` with the
generator's subdir names (synthetic_speech: CREMA-D, ESC-50; synthetic_vision: coco); the
generator writes into that shared parent `<dir>`. A coco part may name its `split` (train2017,
...; default val2017), so one root serves every split. `select` picks a deterministic (optionally
stratified) subset, `derive_labels` turns raw fields into probe classes, and `load_media`
reads one record's audio or image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mcollapse.data import coco, cremad, esc50, librispeech
from mcollapse.data.base import SAMPLE_RATE, Record, Sample
from mcollapse.data.generators import generate, generator, read_marker
from mcollapse.data.labels import INFO_TYPE_FIELDS, LabelColumn, derive_labels
from mcollapse.data.media import load_media
from mcollapse.data.selection import natural_key, select
from mcollapse.data.text import TEXT_NORMALIZATIONS, normalize_text
from mcollapse.errors import DataError, UserError
from mcollapse.store.digest import ContentDigests

__all__ = [
    "FORMATS",
    "INFO_TYPE_FIELDS",
    "SAMPLE_RATE",
    "LabelColumn",
    "Record",
    "Sample",
    "derive_labels",
    "generate",
    "load_media",
    "load_records",
    "select",
    "split_config",
]

log = logging.getLogger(__name__)

FORMATS: dict[str, ModuleType] = {
    "librispeech": librispeech,
    "cremad": cremad,
    "esc50": esc50,
    "coco": coco,
}


def _plain(value):
    """OmegaConf containers as plain dicts/lists; anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _generation_dir(name: str, roots: list[Path]) -> Path:
    parents = {root.parent for root in roots}
    if len(parents) != 1:
        raise UserError(
            f"dataset {name!r}: generated parts must share one parent directory, got "
            + ", ".join(str(p) for p in sorted(parents))
        )
    return parents.pop()


def _ensure_generated(name: str, generator_name: str, options: dict, roots: list[Path]) -> bool:
    """Generate when parts are missing or were generated with other options; user data stays."""
    out_dir = _generation_dir(name, roots)
    if read_marker(out_dir) is None and all(root.is_dir() for root in roots):
        return False  # provided by the user in the expected layout
    generated = generate(generator_name, out_dir, options)
    subdirs = generator(generator_name).SUBDIRS
    for root in roots:
        if not root.is_dir():
            raise DataError(
                f"dataset {name!r}: part root {root} is not one of the generated "
                f"{', '.join(str(out_dir / s) for s in subdirs)}"
            )
    return generated


def _fingerprint(parts: list[tuple[str, list[Record]]], marker: dict | None, text_normalization: str,
                 digests: ContentDigests) -> str:
    """Changes when ids, file names or contents, generator options or the text normalisation
    change; cache keys use it. Texts are not in it: the keys that read texts digest them."""
    digest = hashlib.sha256(json.dumps(marker, sort_keys=True).encode())
    if text_normalization != "none":
        digest.update(f"text_normalization\0{text_normalization}\n".encode())
    for fmt, records in parts:
        for record in records:
            content = digests(record.path)
            digest.update(f"{fmt}\0{record.id}\0{record.path.name}\0{content}\n".encode())
    digests.save()
    return digest.hexdigest()


def split_config(dataset_cfg, split: str):
    """The dataset config reading the named split (`dataset.splits.<split>`) instead of `parts`.

    The split's name joins the dataset's (`name@split`), so its fingerprint and cache keys are its own."""
    splits = getattr(dataset_cfg, "splits", None) or {}
    if split not in splits:
        known = ", ".join(sorted(splits)) or "none"
        raise UserError(f"dataset {dataset_cfg.name!r} has no split {split!r} (splits: {known})")
    cfg = OmegaConf.create(_plain(dataset_cfg))
    with open_dict(cfg):
        cfg.parts = cfg.splits[split]
        cfg.name = f"{dataset_cfg.name}@{split}"
    return cfg


def load_records(dataset_cfg, digests: ContentDigests | None = None) -> tuple[list[Record], dict]:
    """All records of a dataset config, sorted by id, and a summary of what was skipped and why.

    The summary holds `n_records`, `skipped` ({"<format>: <reason>": count}), per-part counts,
    whether a synthetic set was generated now, and a content `fingerprint` (media hashed through
    `digests`, which can keep the hashes between runs).
    """
    name = str(getattr(dataset_cfg, "name", "dataset"))
    parts = list(dataset_cfg.parts or [])
    if not parts:
        raise UserError(f"dataset {name!r} has no parts")
    for part in parts:
        if part.format not in FORMATS:
            raise UserError(
                f"dataset {name!r}: unknown format {part.format!r}; known: {', '.join(FORMATS)}"
            )
        if getattr(part, "split", None) and part.format != "coco":
            raise UserError(f"dataset {name!r}: only coco parts name a split, not {part.format!r}")
    text_normalization = str(getattr(dataset_cfg, "text_normalization", "none"))
    if text_normalization not in TEXT_NORMALIZATIONS:
        raise UserError(f"dataset {name!r}: text_normalization {text_normalization!r} is not one of "
                        f"{', '.join(TEXT_NORMALIZATIONS)}")
    roots = [Path(str(part.root)).expanduser() for part in parts]
    generator_name = getattr(dataset_cfg, "generate", None)
    generated = False
    marker = None
    if generator_name:
        options = _plain(getattr(dataset_cfg, "generate_options", None)) or {}
        generated = _ensure_generated(name, generator_name, options, roots)
        marker = read_marker(roots[0].parent)

    records: list[Record] = []
    skipped: Counter = Counter()
    per_part = []
    loaded: list[tuple[str, list[Record]]] = []
    for part, root in zip(parts, roots):
        module = FORMATS[part.format]
        split = getattr(part, "split", None)
        if not root.is_dir():
            raise DataError(f"dataset {name!r}: {root} not found; expected {module.LAYOUT}")
        try:
            part_records, part_skipped = module.load_part(root, split) if split else module.load_part(root)
        except DataError as exc:
            raise DataError(f"dataset {name!r}: {exc}") from exc
        if not part_records:
            raise DataError(
                f"dataset {name!r}: no usable samples under {root}; expected "
                f"{module.layout(split) if split else module.LAYOUT}"
            )
        for reason, count in sorted(part_skipped.items()):
            skipped[f"{part.format}: {reason}"] += count
            log.warning("%s (%s): skipped %d file(s): %s", name, root, count, reason)
        per_part.append(
            {"format": part.format, "root": str(root), **({"split": split} if split else {}),
             "n_records": len(part_records), "skipped": dict(sorted(part_skipped.items()))}
        )  # fmt: skip
        loaded.append((part.format, part_records))
        records.extend(part_records)

    duplicates = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if duplicates:
        raise DataError(f"dataset {name!r}: parts share sample ids, e.g. {min(duplicates)!r}")
    records.sort(key=lambda r: natural_key(r.id))
    if text_normalization != "none":
        records = [dataclasses.replace(r, text=normalize_text(r.text, text_normalization)) if r.text else r
                   for r in records]
    info = {
        "n_records": len(records),
        "skipped": dict(sorted(skipped.items())),
        "n_skipped": sum(skipped.values()),
        "parts": per_part,
        "generated": generated,
        "generator": marker,
        "fingerprint": _fingerprint(loaded, marker, text_normalization, digests or ContentDigests()),
    }
    return records, info
