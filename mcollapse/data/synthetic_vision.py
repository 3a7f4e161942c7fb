"""A small offline image set in the real COCO layout: drawn shapes with exact boxes and
compositional captions, in three image-disjoint splits.

Each image holds 0..max_objects coloured shapes (circle/square/triangle -> "shape",
star/cross -> "symbol") on a lightly noisy background (never a single colour). Per image, the
object count, a common object size and a spread (objects scattered around a centre with a
chosen radius) vary, so object_count, object_size and spatial_spread labels all have range; half
the images mix small, medium and large objects. Placements whose boxes would overlap (with a
2-pixel margin) are rejected, so no object hides another and every annotation is visible.
Annotations carry exact boxes, polygon areas and segmentations with iscrowd=0.

Two captions per image say the same things in different words: every object's count, size,
colour, shape and position (the cell of a 3x3 grid holding its box centre), e.g. "two small red
circles in the top left and a large blue star on the right" and "in the upper left corner there
are two small circles in red; on the right side there is one large star in blue". Size words come
from the box side relative to the image (small < 12%, large >= 22%, medium between).

Splits: `val2017` (n_images, ids 1..n_images; the evaluated part), `dev2017` (n_dev_images) and
`train2017` (n_train_images), with consecutive, disjoint image ids and file names. Images are
128-pixel JPEGs by default: the vision encoders resize to 224 anyway, and small files keep a
3,400-image set near 20 MB. Read back by the ordinary `coco` loader (a part's `split` names the
split; see mcollapse.data.coco). Deterministic: image `i` is drawn from a generator seeded with
(seed, i).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mcollapse.errors import UserError

VERSION = 2
SUBDIRS = ("coco",)
DEFAULT_OPTIONS = {"n_images": 200, "n_dev_images": 200, "n_train_images": 3000,
                   "image_size": 128, "max_objects": 14, "seed": 0}  # fmt: skip
SPLITS = (("val2017", "n_images"), ("dev2017", "n_dev_images"), ("train2017", "n_train_images"))

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
NUMBER_WORDS_ALT = ("no", "one", *NUMBER_WORDS[2:])
MARGIN = 2.0  # pixels kept free between boxes
MIN_SIDE = 6.0
SMALL, LARGE = 0.12, 0.22  # box side / image side: below SMALL "small", from LARGE on "large"
SIZE_FACTORS = (0.6, 1.0, 1.6)  # per-object side factors of an image that mixes sizes
# (row, column) of the 3x3 grid cell holding an object's centre -> two wordings of its place
REGIONS = {
    (0, 0): ("in the top left", "in the upper left corner"),
    (0, 1): ("at the top", "along the top edge"),
    (0, 2): ("in the top right", "in the upper right corner"),
    (1, 0): ("on the left", "on the left side"),
    (1, 1): ("in the centre", "in the middle"),
    (1, 2): ("on the right", "on the right side"),
    (2, 0): ("in the bottom left", "in the lower left corner"),
    (2, 1): ("at the bottom", "along the bottom edge"),
    (2, 2): ("in the bottom right", "in the lower right corner"),
}


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


def size_word(side: float, size: int) -> str:
    """small / medium / large from the box side relative to the image side."""
    fraction = side / size
    return "small" if fraction < SMALL else "large" if fraction >= LARGE else "medium"


def region(box, size: int) -> tuple[int, int]:
    """(row, column) of the 3x3 grid cell holding the box centre."""
    x, y, w, h = box
    return min(int(3 * (y + h / 2) / size), 2), min(int(3 * (x + w / 2) / size), 2)


def place_objects(rng: np.random.Generator, count: int, size: int) -> list[dict]:
    """Non-overlapping objects scattered around a centre with a random spread, drawn from 1-3
    shapes and 1-3 colours; a common size, or (half the images) a mix of small, medium and large
    around it."""
    side_mean = min(rng.uniform(0.1, 0.45) * size, size * math.sqrt(0.28 / max(count, 1)))
    centre = rng.uniform(0.3, 0.7, size=2) * size
    spread = rng.uniform(0.05, 0.45) * size
    mixed = bool(rng.random() < 0.5)
    # a few shapes and colours per image, so objects repeat and captions count them
    shapes = [CATEGORIES[i][1] for i in rng.choice(len(CATEGORIES), rng.integers(1, 4), replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), rng.integers(1, 4), replace=False)]
    placed: list[dict] = []
    for _ in range(count):
        name = shapes[rng.integers(len(shapes))]
        colour = colours[rng.integers(len(colours))]
        factor = SIZE_FACTORS[rng.integers(len(SIZE_FACTORS))] if mixed else 1.0
        side = min(max(MIN_SIDE, side_mean * factor * rng.uniform(0.8, 1.25)), 0.6 * size)
        for attempt in range(300):
            if attempt and attempt % 60 == 0:  # crowded: shrink, and widen the scatter
                side, spread = max(MIN_SIDE, side * 0.85), spread * 1.3
            x, y = rng.normal(centre, spread) - side / 2
            x, y = float(np.clip(x, 1, size - side - 1)), float(np.clip(y, 1, size - side - 1))
            points = shape_polygon(name, x, y, side)
            box = polygon_box(points)
            if not any(boxes_overlap(box, other["bbox"]) for other in placed):
                placed.append({"name": name, "colour": colour, "points": points, "bbox": box,
                               "size": size_word(max(box[2], box[3]), size),
                               "region": region(box, size)})  # fmt: skip
                break
    return placed


def _groups(objects: list[dict]) -> dict[tuple, int]:
    """(size, colour, shape, region) -> count, in order of first appearance."""
    groups: dict[tuple, int] = {}
    for o in objects:
        key = (o["size"], o["colour"], o["name"], o["region"])
        groups[key] = groups.get(key, 0) + 1
    return groups


def _number(n: int, words=NUMBER_WORDS) -> str:
    return words[n] if n < len(words) else str(n)


def _join(phrases: list[str], sep: str = ", ") -> str:
    return phrases[0] if len(phrases) == 1 else f"{sep.join(phrases[:-1])} and {phrases[-1]}"


def caption(objects: list[dict]) -> str:
    """ "two small red circles in the top left and a large blue star on the right": one phrase per
    group of equal size, colour, shape and place, in order of first appearance."""
    if not objects:
        return "an empty background"
    return _join([
        f"{_number(n)} {size} {colour} {name if n == 1 else PLURALS[name]} {REGIONS[place][0]}"
        for (size, colour, name, place), n in _groups(objects).items()
    ])  # fmt: skip


def caption_by_place(objects: list[dict]) -> str:
    """The same content as `caption` in other words, by place in reading order: "in the upper
    left corner there are two small circles in red; on the right side there is one large star in
    blue"."""
    if not objects:
        return "a plain background with no shapes on it"
    by_place: dict[tuple, list[str]] = {}
    first: dict[tuple, int] = {}
    for (size, colour, name, place), n in _groups(objects).items():
        first.setdefault(place, n)
        by_place.setdefault(place, []).append(
            f"{_number(n, NUMBER_WORDS_ALT)} {size} {name if n == 1 else PLURALS[name]} in {colour}"
        )
    return "; ".join(
        f"{REGIONS[place][1]} there {'is' if first[place] == 1 else 'are'} {_join(items)}"
        for place, items in sorted(by_place.items())
    )


def _draw(objects: list[dict], size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    tint = rng.uniform(200, 245, size=3)
    pixels = np.clip(tint + rng.normal(0, 5, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon(obj["points"], fill=COLOURS[obj["colour"]])
    return image


def _write_split(root: Path, split: str, image_ids: range, options: dict) -> None:
    """`root/<split>/*.jpg` and `root/annotations/{instances,captions}_<split>.json`."""
    size, max_objects = int(options["image_size"]), int(options["max_objects"])
    image_dir = root / split
    image_dir.mkdir(parents=True)
    category_ids = {name: cid for cid, name, _ in CATEGORIES}
    images, instances, captions = [], [], []
    for image_id in image_ids:
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
        for text in (caption(objects), caption_by_place(objects)):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    info = {
        "description": f"synthetic drawn shapes in the COCO {split} layout",
        "version": str(VERSION),
    }
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES]
    documents = {
        f"instances_{split}.json": {"info": info, "images": images, "annotations": instances,
                                    "categories": categories},
        f"captions_{split}.json": {"info": info, "images": images, "annotations": captions},
    }  # fmt: skip
    for name, document in documents.items():
        (root / "annotations" / name).write_text(json.dumps(document), encoding="utf-8")


def write(out_dir: Path, options: dict) -> None:
    """`out_dir/coco/{val2017,dev2017,train2017}/*.jpg` and their
    `out_dir/coco/annotations/{instances,captions}_<split>.json`; image ids run on across splits."""
    counts = [int(options[key]) for _, key in SPLITS]
    size, max_objects = int(options["image_size"]), int(options["max_objects"])
    if counts[0] < 1 or min(counts) < 0 or size < 32 or not 1 <= max_objects <= 30:
        raise UserError("synthetic_vision needs n_images >= 1, n_dev_images and n_train_images >= 0, "
                        "image_size >= 32, max_objects 1..30")
    root = out_dir / "coco"
    (root / "annotations").mkdir(parents=True)
    first = 1
    for (split, _), count in zip(SPLITS, counts):
        _write_split(root, split, range(first, first + count), options)
        first += count
