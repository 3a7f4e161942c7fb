"""Synthetic generators write real layouts that the ordinary loaders read back."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mcollapse.config import DatasetConfig, DatasetPart
from mcollapse.data import (
    derive_labels,
    espeak,
    load_media,
    load_records,
    split_config,
    synthetic_speech,
    synthetic_vision,
)
from mcollapse.data.generators import generate
from mcollapse.data.synthetic_vision import boxes_overlap
from mcollapse.errors import DataError, UserError

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed"
)


def speech_config(data_root, **options):
    return DatasetConfig(
        name="synthetic_speech",
        modality="audio",
        parts=[
            DatasetPart("cremad", str(data_root / "synthetic_speech" / "CREMA-D")),
            DatasetPart("esc50", str(data_root / "synthetic_speech" / "ESC-50")),
        ],
        info_types=["lexical", "speaker", "emotion", "acoustic"],
        generate="synthetic_speech",
        generate_options=options,
    )


def vision_config(data_root, **options):
    """The evaluated val2017 part, with small train2017 and dev2017 splits beside it (unless set)."""
    root = str(data_root / "synthetic_vision" / "coco")
    return DatasetConfig(
        name="synthetic_vision",
        modality="image",
        parts=[DatasetPart("coco", root)],
        splits={"train": [DatasetPart("coco", root, "train2017")],
                "dev": [DatasetPart("coco", root, "dev2017")]},
        info_types=["lexical", "object_category", "super_category", "object_count",
                    "object_size", "spatial_spread"],
        generate="synthetic_vision",
        generate_options={"n_dev_images": 2, "n_train_images": 3, **options},
    )  # fmt: skip


SMALL_SPEECH = {"n_speakers": 3, "n_sentences": 3, "emotions": ["NEU", "SAD"],
                "n_per_class": 2, "n_sound_classes": 3, "sound_seconds": 1.0}  # fmt: skip


@needs_espeak
def test_speech_has_every_speaker_sentence_emotion_once(tmp_path):
    records, info = load_records(speech_config(tmp_path, **SMALL_SPEECH))
    assert info["generated"] is True and info["skipped"] == {}
    speech = [r for r in records if "speaker_id" in r.fields]
    sounds = [r for r in records if "sound_class" in r.fields]
    assert len(speech) == 3 * 3 * 2 and len(sounds) == 3 * 2
    combos = Counter(
        (r.fields["speaker_id"], r.fields["sentence_code"], r.fields["emotion"]) for r in speech
    )
    expected = itertools.product(
        ["1001", "1002", "1003"], ["IEO", "TIE", "IOM"], ["neutral", "sadness"]
    )
    assert combos == Counter(expected)
    assert {r.text for r in speech} == {
        "It's eleven o'clock", "That is exactly what happened", "I'm on my way to the meeting",
    }  # fmt: skip
    labels = derive_labels(records, ["speaker", "emotion", "acoustic"])
    assert labels["speaker"].class_counts() == {"1001": 6, "1002": 6, "1003": 6}
    assert labels["acoustic"].class_counts() == {"tone": 2, "chirp": 2, "noise_burst": 2}

    durations = {}
    for record in speech:
        assert sf.info(str(record.path)).samplerate == 16_000
        audio = load_media(record, strict=True).audio
        durations.setdefault(record.fields["emotion"], []).append(audio.size)
    assert np.mean(durations["sadness"]) > 1.15 * np.mean(durations["neutral"])  # slower prosody
    assert sf.info(str(sounds[0].path)).samplerate == 44_100
    assert load_media(sounds[0], strict=True).audio.size == 16_000

    _, info_again = load_records(speech_config(tmp_path, **SMALL_SPEECH))
    assert info_again["generated"] is False and info_again["fingerprint"] == info["fingerprint"]


def test_speech_without_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"apt-get install espeak-ng") as error:
        load_records(speech_config(tmp_path, **SMALL_SPEECH))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "synthetic_speech").exists()


def test_sound_plan_is_seeded():
    first = synthetic_speech.sound_clip("chirp", np.random.default_rng(1), 1.0)
    second = synthetic_speech.sound_clip("chirp", np.random.default_rng(1), 1.0)
    np.testing.assert_array_equal(first, second)
    plan = synthetic_speech.speech_plan({**synthetic_speech.DEFAULT_OPTIONS, "seed": 3})
    assert plan == synthetic_speech.speech_plan({**synthetic_speech.DEFAULT_OPTIONS, "seed": 3})
    assert len(plan) == 8 * 12 * 4 and len({c["voice"] for c in plan}) == 8


def test_vision_reads_back_with_labels_and_no_overlaps(tmp_path):
    records, info = load_records(vision_config(tmp_path, n_images=60, seed=1))
    assert len(records) == 60 and info["skipped"] == {}
    instances = json.loads(
        (
            tmp_path / "synthetic_vision" / "coco" / "annotations" / "instances_val2017.json"
        ).read_text()
    )
    boxes_by_image: dict[int, list] = {}
    for ann in instances["annotations"]:
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
        boxes_by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    for boxes in boxes_by_image.values():
        for a, b in itertools.combinations(boxes, 2):
            assert not boxes_overlap(a, b, margin=0.0)
    by_id = {int(r.id): r for r in records}
    assert all(by_id[i].fields["object_count"] == len(b) for i, b in boxes_by_image.items())

    labels = derive_labels(records, vision_config(tmp_path).info_types)
    assert set(labels["super_category"].class_counts()) == {"shape", "symbol"}
    assert len(labels["object_category"].class_counts()) == 5
    assert set(labels["object_count"].class_counts()) == {"1", "2-4", "5-10", "11+"}
    assert set(labels["object_size"].class_counts()) == {"small", "medium", "large"}
    image = load_media(records[0], strict=True).image
    assert image.size == (128, 128) and image.mode == "RGB"
    assert records[0].text and records[0].text.split()[-1] in {
        "background", "left", "right", "top", "bottom", "centre"}


def test_vision_captions_name_groups_in_two_wordings():
    objects = [
        {"colour": "red", "name": "circle", "size": "small", "region": (0, 0)},
        {"colour": "blue", "name": "star", "size": "large", "region": (1, 2)},
        {"colour": "red", "name": "circle", "size": "small", "region": (0, 0)},
    ]
    assert synthetic_vision.caption(objects) == (
        "two small red circles in the top left and a large blue star on the right")
    assert synthetic_vision.caption_by_place(objects) == (
        "in the upper left corner there are two small circles in red; "
        "on the right side there is one large star in blue")
    assert synthetic_vision.caption([]) == "an empty background"


SPLIT_OPTIONS = {"n_images": 12, "n_dev_images": 5, "n_train_images": 15, "seed": 3}


def test_vision_splits_are_disjoint_and_each_reads_back(tmp_path):
    cfg = vision_config(tmp_path, **SPLIT_OPTIONS)
    val, info = load_records(cfg)
    train, train_info = load_records(split_config(cfg, "train"))
    dev, _ = load_records(split_config(cfg, "dev"))
    assert (len(val), len(dev), len(train)) == (12, 5, 15)
    assert info["generated"] and not train_info["generated"]  # one generation writes every split
    assert {r.path.parent.name for r in val} == {"val2017"}
    assert {r.path.parent.name for r in train} == {"train2017"}
    assert {r.path.parent.name for r in dev} == {"dev2017"}
    ids = [r.id for r in val + dev + train]
    names = [r.path.name for r in val + dev + train]
    assert len(set(ids)) == len(ids) == len(set(names)) == 32
    assert all(r.text for r in val + dev + train) and train_info["skipped"] == {}
    assert info["fingerprint"] != train_info["fingerprint"]


PHRASE = re.compile(r"(\w+) (small|medium|large) (\w+) (\w+) (in the top left|at the top|in the top "
                    r"right|on the left|in the centre|on the right|in the bottom left|at the "
                    r"bottom|in the bottom right)(?:,|$| and)")
ITEM = re.compile(r"(\w+) (small|medium|large) (\w+) in (\w+)")


def _number(word):
    return {"a": 1, "one": 1}.get(word) or synthetic_vision.NUMBER_WORDS.index(word)


def _singular(noun):
    return {plural: name for name, plural in synthetic_vision.PLURALS.items()}.get(noun, noun)


def test_vision_captions_agree_with_boxes_and_pixels(tmp_path):
    """Both captions of each image name the count, size, colour, shape and place of its objects,
    as read back from the annotations (size, shape, place) and the pixels (colour)."""
    load_records(vision_config(tmp_path, n_images=12, seed=3))
    root = tmp_path / "synthetic_vision" / "coco"
    instances = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    captions = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    regions = {words: cell for cell, pair in synthetic_vision.REGIONS.items() for words in pair}
    palette = {name: np.array(rgb) for name, rgb in synthetic_vision.COLOURS.items()}
    by_image = {}
    for image in instances["images"]:
        pixels = np.asarray(Image.open(root / "val2017" / image["file_name"]).convert("RGB"), dtype=float)
        expected = Counter()
        for ann in (a for a in instances["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            rgb = pixels[int(y + h / 2), int(x + w / 2)]
            colour = min(palette, key=lambda c: np.abs(palette[c] - rgb).sum())
            side = max(w, h) / 128
            size = "small" if side < 0.12 else "large" if side >= 0.22 else "medium"
            cell = (min(int(3 * (y + h / 2) / 128), 2), min(int(3 * (x + w / 2) / 128), 2))
            expected[(size, colour, names[ann["category_id"]], cell)] += 1
        by_image[image["id"]] = expected
    texts = {}
    for ann in captions["annotations"]:
        texts.setdefault(ann["image_id"], []).append(ann["caption"])
    assert sorted(texts) == sorted(by_image) and sum(len(e) > 1 for e in by_image.values()) >= 3
    for image_id, expected in by_image.items():
        first, second = texts[image_id]
        said = Counter()
        for number, size, colour, noun, place in PHRASE.findall(first):
            said[(size, colour, _singular(noun), regions[place])] += _number(number)
        assert said == expected, first
        said = Counter()
        for clause in second.split("; ") if expected else []:
            place, _, items = re.match(r"(.*) there (is|are) (.*)", clause).groups()
            for number, size, noun, colour in ITEM.findall(items):
                said[(size, colour, _singular(noun), regions[place])] += _number(number)
        assert said == expected, second


def test_vision_generation_is_deterministic(tmp_path):
    options = {"n_images": 6, "n_dev_images": 2, "n_train_images": 4, "seed": 5}
    for name in ("a", "b"):
        generate("synthetic_vision", tmp_path / name, options)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 2 + 12 + 1  # annotations, images, marker
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    generate("synthetic_vision", tmp_path / "c", {**options, "seed": 6})
    val = "coco/annotations/captions_val2017.json"
    assert (tmp_path / "a" / val).read_text() != (tmp_path / "c" / val).read_text()


def test_generation_reruns_only_when_options_change(tmp_path):
    _, first = load_records(vision_config(tmp_path, n_images=5))
    _, same = load_records(vision_config(tmp_path, n_images=5))
    records, changed = load_records(vision_config(tmp_path, n_images=7))
    assert (first["generated"], same["generated"], changed["generated"]) == (True, False, True)
    assert len(records) == 7 and changed["generator"]["options"]["n_images"] == 7
    assert first["fingerprint"] != changed["fingerprint"]


def test_interrupted_generation_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    original = synthetic_vision.write

    def write_then_fail(out_dir, options):
        original(out_dir, options)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_vision, "write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        load_records(vision_config(tmp_path, n_images=3))
    assert not (tmp_path / "synthetic_vision").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    monkeypatch.setattr(synthetic_vision, "write", original)
    records, info = load_records(vision_config(tmp_path, n_images=3))
    assert len(records) == 3 and info["generated"] is True


def test_user_data_in_place_is_never_regenerated(tmp_path):
    load_records(vision_config(tmp_path, n_images=4))
    (tmp_path / "synthetic_vision" / "generated.json").unlink()  # now it looks like user data
    records, info = load_records(vision_config(tmp_path, n_images=9))
    assert len(records) == 4 and info["generated"] is False


def test_unmarked_directory_with_missing_parts_is_an_error(tmp_path):
    (tmp_path / "synthetic_vision" / "something").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by the synthetic_vision generator"):
        load_records(vision_config(tmp_path, n_images=4))


def test_unknown_generator_option(tmp_path):
    with pytest.raises(UserError, match="n_pictures"):
        load_records(vision_config(tmp_path, n_pictures=4))


@needs_espeak
def test_espeak_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_speech, "VOICES", ("zzzvoice",))
    options = {"n_speakers": 1, "n_sentences": 2, "emotions": ["NEU"], "n_per_class": 1}
    with pytest.raises(UserError, match="espeak-ng failed for voice zzzvoice") as error:
        load_records(speech_config(tmp_path, **options))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "synthetic_speech").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
