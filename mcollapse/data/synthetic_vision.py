"""A small offline image set in the real COCO val2017 layout: drawn shapes with exact boxes.

Each image holds 0..max_objects coloured shapes (circle/square/triangle -> "shape",
star/cross -> "symbol") on a lightly noisy background (never a single colour). Per image, the
object count, a common object size and a spread (objects scattered around a centre with a
chosen radius) vary, so object_count, object_size and spatial_spread labels all have range.
Placements whose boxes would overlap (with a 2-pixel margin) are rejected, so no object hides
another and every annotation is visible. Annotations carry exact boxes, polygon areas and
segmentations with iscrowd=0; two captions per image describe the objects ("two red circles and
a blue square"). Read back by the ordinary `coco` loader.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from mcollapse.errors import UserError

VERSION = 1
SUBDIRS = ("coco",)
DEFAULT_OPTIONS = {"n_images": 200, "image_size": 128, "max_objects": 14, "seed": 0}

CATEGORIES = (
    (1, "circle", "shape"),
    (2, "square", "shape"),
    (3, "triangle", "shape"),
    (4, "star", "symbol"),
    (5, "cross", "symbol"),
)
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}  # fmt: skip
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 30),
    "purple": (135, 60, 165),
    "black": (30, 30, 30),
}
NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty")  # fmt: skip
MARGIN = 2.0  # pixels kept free between boxes
MIN_SIDE = 6.0


def shape_polygon(name: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """Vertices of a shape filling the square box at (x, y) with this side."""
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    if name == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]  # fmt: skip
    if name == "square":
        return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
    if name == "triangle":
        return [(cx, y), (x + side, y + side), (x, y + side)]
    if name == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = r if k % 2 == 0 else r * 0.45
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if name == "cross":
        a, b = side / 3, 2 * side / 3
        return [(x + a, y), (x + b, y), (x + b, y + a), (x + side, y + a), (x + side, y + b),
                (x + b, y + b), (x + b, y + side), (x + a, y + side), (x + a, y + b), (x, y + b),
                (x, y + a), (x + a, y + a)]  # fmt: skip
    raise ValueError(name)


def polygon_box(points) -> list[float]:
    """Tight COCO box [x, y, w, h] around the vertices."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def polygon_area(points) -> float:
    """Shoelace area."""
    edges = zip(points, points[1:] + points[:1])
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges)) / 2


def boxes_overlap(a, b, margin: float = MARGIN) -> bool:
    """Whether two [x, y, w, h] boxes come closer than `margin`."""
    return not (
        a[0] + a[2] + margin <= b[0]
        or b[0] + b[2] + margin <= a[0]
        or a[1] + a[3] + margin <= b[1]
        or b[1] + b[3] + margin <= a[1]
    )


def _target_count(rng: np.random.Generator, max_objects: int) -> int:
    """Counts spread over the label bins: 0, 1, 2-4, 5-10, 11+."""
    bins = [(0, 0, 0.04), (1, 1, 0.26), (2, 4, 0.30), (5, 10, 0.28), (11, max_objects, 0.12)]
    bins = [(lo, min(hi, max_objects), p) for lo, hi, p in bins if lo <= max_objects]
    weights = np.array([p for _, _, p in bins])
    lo, hi, _ = bins[rng.choice(len(bins), p=weights / weights.sum())]
    return int(rng.integers(lo, hi + 1))


def place_objects(rng: np.random.Generator, count: int, size: int) -> list[dict]:
    """Non-overlapping objects: a common size, scattered around a centre with a random spread."""
    side_mean = min(rng.uniform(0.1, 0.45) * size, size * math.sqrt(0.28 / max(count, 1)))
    centre = rng.uniform(0.3, 0.7, size=2) * size
    spread = rng.uniform(0.05, 0.45) * size
    placed: list[dict] = []
    for _ in range(count):
        name = CATEGORIES[rng.integers(len(CATEGORIES))][1]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        side = max(MIN_SIDE, side_mean * rng.uniform(0.8, 1.25))
        for attempt in range(300):
            if attempt and attempt % 60 == 0:  # crowded: shrink, and widen the scatter
                side, spread = max(MIN_SIDE, side * 0.85), spread * 1.3
            x, y = rng.normal(centre, spread) - side / 2
            x, y = float(np.clip(x, 1, size - side - 1)), float(np.clip(y, 1, size - side - 1))
            points = shape_polygon(name, x, y, side)
            box = polygon_box(points)
            if not any(boxes_overlap(box, other["bbox"]) for other in placed):
                placed.append({"name": name, "colour": colour, "points": points, "bbox": box})
                break
    return placed


def caption(objects: list[dict]) -> str:
    """ "two red circles and a blue square": groups of colour+shape in order of first appearance."""
    if not objects:
        return "an empty background"
    groups = Counter((o["colour"], o["name"]) for o in objects)
    phrases = [
        f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {colour} "
        f"{name if n == 1 else PLURALS[name]}"
        for (colour, name), n in groups.items()
    ]
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def count_caption(objects: list[dict]) -> str:
    """A second, coarser caption, as COCO has several per image."""
    n = len(objects)
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    noun = "object" if n == 1 else "objects"
    return f"{'nothing' if n == 0 else word} {noun} on a plain background"


def _draw(objects: list[dict], size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    tint = rng.uniform(200, 245, size=3)
    pixels = np.clip(tint + rng.normal(0, 5, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon(obj["points"], fill=COLOURS[obj["colour"]])
    return image


def write(out_dir: Path, options: dict) -> None:
    """`out_dir/coco/val2017/*.jpg` and `out_dir/coco/annotations/{instances,captions}_val2017.json`."""
    n_images, size = int(options["n_images"]), int(options["image_size"])
    max_objects = int(options["max_objects"])
    if n_images < 1 or size < 32 or not 1 <= max_objects <= 30:
        raise UserError("synthetic_vision needs n_images >= 1, image_size >= 32, max_objects 1..30")
    image_dir, annotation_dir = out_dir / "coco" / "val2017", out_dir / "coco" / "annotations"
    image_dir.mkdir(parents=True)
    annotation_dir.mkdir(parents=True)
    category_ids = {name: cid for cid, name, _ in CATEGORIES}
    images, instances, captions = [], [], []
    for image_id in range(1, n_images + 1):
        rng = np.random.default_rng([options["seed"], image_id])
        objects = place_objects(rng, _target_count(rng, max_objects), size)
        file_name = f"{image_id:012d}.jpg"
        _draw(objects, size, rng).save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            flat = [round(v, 2) for point in obj["points"] for v in point]
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[obj["name"]],
                    "bbox": [round(v, 2) for v in obj["bbox"]],
                    "area": round(polygon_area(obj["points"]), 2),
                    "iscrowd": 0,
                    "segmentation": [flat],
                }
            )
        for text in (caption(objects), count_caption(objects)):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    info = {
        "description": "synthetic drawn shapes in the COCO val2017 layout",
        "version": str(VERSION),
    }
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES]
    documents = {
        "instances_val2017.json": {"info": info, "images": images, "annotations": instances,
                                   "categories": categories},
        "captions_val2017.json": {"info": info, "images": images, "annotations": captions},
    }  # fmt: skip
    for name, document in documents.items():
        (annotation_dir / name).write_text(json.dumps(document), encoding="utf-8")
