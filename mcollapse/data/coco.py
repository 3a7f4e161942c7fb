"""COCO val2017: images with captions and instance boxes, read with pycocotools.

A part reads one split of a COCO root: `val2017` unless the part names another (`split:
train2017`), i.e. `<root>/<split>/*.jpg` with `<root>/annotations/{instances,captions}_<split>.json`,
so the real COCO tree (train2017 and val2017 under one root) serves both.

Per image, from its non-crowd boxes only (crowd regions are not single objects):

* `object_category`: the category of the largest box (bbox w*h; ties -> lowest annotation id).
  One salient object per image keeps the probe a single-label task; the largest box is the
  object a caption most likely mentions. Images without a non-crowd box get no category.
* `super_category`: that category's COCO supercategory.
* `object_count`: number of non-crowd boxes (int, 0 allowed).
* `avg_object_size`: mean of box area / image area (absent without boxes).
* `spatial_spread`: population std of the distance of normalised box centres from (0.5, 0.5)
  (absent with fewer than 2 boxes, where a spread is undefined).

The text is the image's first caption by annotation id, so it never depends on file order.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from mcollapse.data.base import Record, media_problem
from mcollapse.errors import DataError

DEFAULT_SPLIT = "val2017"


def layout(split: str = DEFAULT_SPLIT) -> str:
    return (f"<root>/{split}/<image>.jpg with <root>/annotations/instances_{split}.json "
            f"and <root>/annotations/captions_{split}.json")


LAYOUT = layout()


def _load_coco(path: Path, required: tuple[str, ...], split: str = DEFAULT_SPLIT):
    """A pycocotools COCO index, quiet (it prints progress) and with a one-line error; a missing
    top-level key is named (pycocotools would index it as empty and every image would vanish)."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataError(f"{path} not found; expected {layout(split)}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            index = COCO(str(path))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as exc:
        raise DataError(f"{path} is not a COCO annotation file ({exc.__class__.__name__})") from exc
    missing = [key for key in required if key not in index.dataset]
    if missing:
        raise DataError(f"{path.name} has no {', '.join(repr(k) for k in missing)}; "
                        f"a COCO annotation file lists {', '.join(required)}")
    return index


def _pixel_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the image header (no decoding); None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def object_fields(boxes: list[dict], categories: dict[int, dict], width: float, height: float):
    """The raw object fields of one image from its non-crowd annotations (see module doc)."""
    fields: dict[str, object] = {"object_count": len(boxes)}
    if not boxes:
        return fields
    largest = max(boxes, key=lambda a: (a["bbox"][2] * a["bbox"][3], -a["id"]))
    category = categories[largest["category_id"]]
    fields["object_category"] = category["name"]
    fields["super_category"] = category["supercategory"]
    sizes = [a["bbox"][2] * a["bbox"][3] / (width * height) for a in boxes]
    fields["avg_object_size"] = float(np.mean(sizes))
    if len(boxes) >= 2:
        distances = [
            math.hypot((x + w / 2) / width - 0.5, (y + h / 2) / height - 0.5)
            for x, y, w, h in (a["bbox"] for a in boxes)
        ]
        fields["spatial_spread"] = float(np.std(distances))
    return fields


def _valid_box(bbox) -> bool:
    """A COCO box is [x, y, width, height] with a positive size."""
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) for v in bbox)
        and bbox[2] > 0
        and bbox[3] > 0
    )


def _first_captions(captions) -> dict[int, str]:
    """Image id -> its caption with the lowest annotation id."""
    first: dict[int, str] = {}
    for ann in sorted(captions.dataset.get("annotations", []), key=lambda a: a["id"]):
        text = str(ann.get("caption", "")).strip()
        if text and ann["image_id"] not in first:
            first[ann["image_id"]] = text
    return first


def load_part(root: Path, split: str | None = None) -> tuple[list[Record], Counter]:
    """One record per annotated image of the split (default val2017) whose file exists with the
    size the annotations give (its boxes are normalised by that size); the rest are counted."""
    split = split or DEFAULT_SPLIT
    image_dir = root / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} not found; expected {layout(split)}")
    annotations = root / "annotations"
    instances = _load_coco(annotations / f"instances_{split}.json", ("images", "annotations", "categories"), split)
    captions = _first_captions(_load_coco(annotations / f"captions_{split}.json", ("annotations",), split))
    categories = instances.cats
    skipped: Counter = Counter()
    records: list[Record] = []
    listed: set[str] = set()
    for image_id in sorted(instances.imgs):
        image = instances.imgs[image_id]
        file_name = str(image.get("file_name", ""))
        listed.add(file_name)
        path = image_dir / file_name
        width, height = image.get("width") or 0, image.get("height") or 0
        if not file_name or width <= 0 or height <= 0:
            skipped["malformed image entry"] += 1
            continue
        problem = media_problem(path, "image")
        if problem:
            skipped[problem] += 1
            continue
        size = _pixel_size(path)
        if size is not None and size != (width, height):  # unreadable files are counted at load
            skipped["image size differs from its annotation"] += 1
            continue
        boxes = [a for a in instances.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if any(a.get("category_id") not in categories for a in boxes):
            skipped["annotation with unknown category"] += 1
            continue
        if not all(_valid_box(a.get("bbox")) for a in boxes):
            skipped["malformed box"] += 1
            continue
        fields = object_fields(boxes, categories, float(width), float(height))
        records.append(Record(str(image_id), path.resolve(), "image", captions.get(image_id), fields))
    unlisted = sum(1 for p in image_dir.glob("*.jpg") if p.name not in listed)
    if unlisted:
        skipped["image file not in annotations"] += unlisted
    return records, skipped
