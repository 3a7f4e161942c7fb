"""Loaders read small fixture trees written in each dataset's real on-disk layout."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf
from PIL import Image

from mcollapse.config import DatasetConfig, DatasetPart
from mcollapse.data import load_records
from mcollapse.data.coco import object_fields
from mcollapse.data.selection import natural_key
from mcollapse.errors import DataError, UserError

RATE = 16_000


def write_tone(path, seconds=0.2, rate=RATE, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format=fmt)


def dataset(fmt, root, **kw):
    return DatasetConfig(
        name=f"test_{fmt}", modality="audio", parts=[DatasetPart(fmt, str(root))], **kw
    )


# ---------------------------------------------------------------- LibriSpeech


def make_librispeech(root):
    chapters = {("1089", "134686"): 3, ("121", "121726"): 2}
    for (speaker, chapter), n in chapters.items():
        folder = root / speaker / chapter
        lines = []
        for utt in range(n):
            uid = f"{speaker}-{chapter}-{utt:04d}"
            write_tone(folder / f"{uid}.flac", fmt="FLAC")
            lines.append(f"{uid} HE HOPED THERE WOULD BE STEW {utt}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    folder = root / "1089" / "134686"
    write_tone(folder / "not-an-utterance.flac", fmt="FLAC")  # malformed name
    write_tone(folder / "1089-134686-0099.flac", fmt="FLAC")  # no transcript line
    with (folder / "1089-134686.trans.txt").open("a") as handle:
        handle.write("1089-134686-0050 A LINE WITHOUT AUDIO\n")
    return root


def test_librispeech_records_fields_and_skips(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech" / "test-clean")
    records, info = load_records(dataset("librispeech", root))
    assert [r.id for r in records][:3] == ["121-121726-0000", "121-121726-0001", "1089-134686-0000"]
    first = records[2]
    assert first.text == "HE HOPED THERE WOULD BE STEW 0"  # original case kept
    assert first.fields == {"speaker_id": "1089", "chapter_id": "134686"}
    assert first.modality == "audio" and first.path.is_file()
    assert info["skipped"] == {
        "librispeech: malformed file name": 1,
        "librispeech: missing audio file": 1,
        "librispeech: no transcript line": 1,
    }
    assert info["n_records"] == 5 and info["generated"] is False


def test_librispeech_id_with_two_different_transcripts_is_skipped_and_counted(tmp_path):
    """Which line is right cannot be known, so neither is used; a repeated identical line is harmless."""
    root = make_librispeech(tmp_path / "LibriSpeech" / "test-clean")
    with (root / "121" / "121726" / "121-121726.trans.txt").open("a") as handle:
        handle.write("121-121726-0000 A DIFFERENT SENTENCE\n121-121726-0001 HE HOPED THERE WOULD BE STEW 1\n")
    records, info = load_records(dataset("librispeech", root))
    ids = [r.id for r in records]
    assert "121-121726-0000" not in ids and "121-121726-0001" in ids
    assert info["skipped"]["librispeech: utterance id with conflicting transcripts"] == 1
    assert info["skipped"]["librispeech: no transcript line"] == 1  # only 0099, as before


# ---------------------------------------------------------------- CREMA-D


def make_cremad(root):
    names = [
        "1001_IEO_NEU_XX", "1001_DFA_ANG_HI", "1002_TSI_SAD_LO", "1002_WSI_HAP_MD",
        "1003_ITH_FEA_XX", "1003_MTI_DIS_XX",
        "1004_XYZ_NEU_XX",  # unknown sentence code
        "1004_IEO_BOR_XX",  # unknown emotion code
        "1004_IEO_NEU_ZZ",  # unknown level
        "broken-name",  # malformed
    ]  # fmt: skip
    for name in names:
        write_tone(root / "AudioWAV" / f"{name}.wav")
    (root / "AudioWAV" / "1005_IEO_NEU_XX.wav").write_bytes(b"")  # empty file
    (root / "AudioWAV" / "notes.txt").write_text("not audio")
    return root


def test_cremad_parses_names_and_counts_skips(tmp_path):
    root = make_cremad(tmp_path / "CREMA-D")
    records, info = load_records(dataset("cremad", root))
    by_id = {r.id: r for r in records}
    assert len(records) == 6
    assert by_id["1001_IEO_NEU_XX"].text == "It's eleven o'clock"
    assert by_id["1001_DFA_ANG_HI"].fields == {
        "speaker_id": "1001", "emotion": "anger", "sentence_code": "DFA", "level": "HI",
    }  # fmt: skip
    assert {r.fields["emotion"] for r in records} == {
        "neutral", "anger", "sadness", "happy", "fear", "disgust",
    }  # fmt: skip
    assert info["skipped"] == {
        "cremad: empty file": 1,
        "cremad: malformed file name": 1,
        "cremad: not a .wav file": 1,
        "cremad: unknown emotion code": 1,
        "cremad: unknown intensity level": 1,
        "cremad: unknown sentence code": 1,
    }
    assert info["n_skipped"] == 6


# ---------------------------------------------------------------- ESC-50


def make_esc50(root):
    rows = [
        ["1-100032-A-0.wav", 1, 0, "dog", "True", 100032, "A"],
        ["2-100038-A-14.wav", 2, 14, "chirping_birds", "False", 100038, "A"],
        ["3-100048-A-0.wav", 3, 0, "dog", "True", 100048, "A"],
        ["4-100099-A-1.wav", 4, 1, "rooster", "True", 100099, "A"],  # audio file missing
        ["", 5, 1, "rooster", "True", 1, "A"],  # malformed row
    ]
    for row in rows[:3]:
        write_tone(root / "audio" / row[0], rate=44_100)
    (root / "meta").mkdir(parents=True)
    with (root / "meta" / "esc50.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)
    return root


def test_esc50_reads_meta(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    records, info = load_records(dataset("esc50", root))
    assert [r.id for r in records] == ["1-100032-A-0", "2-100038-A-14", "3-100048-A-0"]
    assert records[1].fields == {"sound_class": "chirping_birds", "fold": "2"}
    assert all(r.text is None for r in records)
    assert info["skipped"] == {"esc50: malformed meta row": 1, "esc50: missing audio file": 1}


def test_esc50_meta_without_required_columns(tmp_path):
    root = tmp_path / "ESC-50"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("name,label\na.wav,dog\n")
    with pytest.raises(DataError, match="category"):
        load_records(dataset("esc50", root))


# ---------------------------------------------------------------- COCO


def make_coco(root):
    """Image 1: three boxes + one crowd box; image 2: one box; image 3: none; image 4: no file."""
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 50} for i in (1, 2, 3, 4)
    ]
    (root / "val2017").mkdir(parents=True)
    for image in images[:3]:
        Image.new("RGB", (100, 50), (10 * image["id"], 80, 120)).save(
            root / "val2017" / image["file_name"]
        )
    Image.new("RGB", (10, 10)).save(root / "val2017" / "000000000777.jpg")  # not in annotations
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]

    def box(ann_id, image_id, cat, bbox, crowd=0):
        return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
                "area": bbox[2] * bbox[3], "iscrowd": crowd, "segmentation": []}  # fmt: skip

    instances = [
        box(10, 1, 1, [0, 0, 10, 10]),
        box(11, 1, 18, [50, 25, 20, 10]),  # largest non-crowd box: dog
        box(12, 1, 3, [80, 40, 10, 5]),
        box(13, 1, 3, [0, 0, 100, 50], crowd=1),  # crowd: ignored although largest
        box(20, 2, 3, [10, 10, 30, 20]),
    ]
    captions = [
        {"id": 7, "image_id": 1, "caption": "A dog near a person."},
        {"id": 3, "image_id": 1, "caption": " A person walks a dog. "},  # lowest id: first
        {"id": 5, "image_id": 2, "caption": "A parked car."},
    ]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": categories})
    )
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": captions})
    )
    return root


def test_coco_fields_captions_and_skips(tmp_path):
    root = make_coco(tmp_path / "coco")
    cfg = DatasetConfig(name="coco", modality="image", parts=[DatasetPart("coco", str(root))])
    records, info = load_records(cfg)
    assert [r.id for r in records] == ["1", "2", "3"]
    one, two, three = records
    assert one.text == "A person walks a dog."
    assert one.modality == "image"
    assert one.fields["object_category"] == "dog" and one.fields["super_category"] == "animal"
    assert one.fields["object_count"] == 3
    assert one.fields["avg_object_size"] == pytest.approx((100 + 200 + 50) / 3 / 5000)
    centres = [(0.05, 0.1), (0.6, 0.6), (0.85, 0.85)]
    distances = [math.hypot(x - 0.5, y - 0.5) for x, y in centres]
    assert one.fields["spatial_spread"] == pytest.approx(float(np.std(distances)))
    assert two.fields["object_count"] == 1 and "spatial_spread" not in two.fields
    assert two.fields["object_category"] == "car"
    assert three.fields == {"object_count": 0} and three.text is None
    assert info["skipped"] == {
        "coco: image file not in annotations": 1,
        "coco: missing image file": 1,
    }


def test_coco_image_whose_pixels_disagree_with_its_json_size_is_skipped(tmp_path):
    """Boxes are normalised by the JSON size, so an image of another size would get wrong fields."""
    root = make_coco(tmp_path / "coco")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "val2017" / "000000000002.jpg")
    Image.new("RGB", (64, 48), (9, 9, 9)).save(root / "val2017" / "000000000003.jpg")
    cfg = DatasetConfig(name="coco", modality="image", parts=[DatasetPart("coco", str(root))])
    records, info = load_records(cfg)
    assert [r.id for r in records] == ["1"]
    assert info["skipped"]["coco: image size differs from its annotation"] == 2


@pytest.mark.parametrize(("file", "key"), [("instances", "categories"), ("instances", "images"),
                                           ("instances", "annotations"), ("captions", "annotations")])
def test_coco_json_without_a_required_key_names_it(tmp_path, file, key):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / f"{file}_val2017.json"
    content = json.loads(path.read_text())
    del content[key]
    path.write_text(json.dumps(content))
    cfg = DatasetConfig(name="coco", modality="image", parts=[DatasetPart("coco", str(root))])
    with pytest.raises(DataError, match=rf"{file}_val2017.json has no '{key}'"):
        load_records(cfg)


def test_coco_largest_box_tie_goes_to_lowest_annotation_id():
    categories = {1: {"name": "a", "supercategory": "x"}, 2: {"name": "b", "supercategory": "y"}}
    boxes = [
        {"id": 9, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 4, "category_id": 2, "bbox": [20, 20, 10, 10]},
    ]
    assert object_fields(boxes, categories, 100, 100)["object_category"] == "b"


# ---------------------------------------------------------------- load_records behaviour


def test_missing_root_names_path_and_layout(tmp_path):
    root = tmp_path / "nowhere" / "CREMA-D"
    with pytest.raises(DataError) as error:
        load_records(dataset("cremad", root))
    message = str(error.value)
    assert str(root) in message and "AudioWAV/<ActorID>_<SentenceCode>" in message
    assert "\n" not in message


def test_root_without_expected_layout(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(DataError, match="val2017"):
        load_records(
            DatasetConfig(
                name="c", modality="image", parts=[DatasetPart("coco", str(tmp_path / "coco"))]
            )
        )


def test_coco_part_reads_the_split_it_names_beside_val2017(tmp_path):
    root = make_coco(tmp_path / "coco")  # val2017: images 1-3; train2017 beside it: image 2 only
    (root / "train2017").mkdir()
    shutil.copy(root / "val2017" / "000000000002.jpg", root / "train2017")
    for kind in ("instances", "captions"):
        document = json.loads((root / "annotations" / f"{kind}_val2017.json").read_text())
        document["images"] = [i for i in document["images"] if i["id"] == 2]
        document["annotations"] = [a for a in document["annotations"] if a["image_id"] == 2]
        (root / "annotations" / f"{kind}_train2017.json").write_text(json.dumps(document))

    def read(**split):
        part = DatasetPart("coco", str(root), **split)
        return load_records(DatasetConfig(name="coco", modality="image", parts=[part]))

    val, _ = read()
    train, info = read(split="train2017")
    assert [r.id for r in val] == ["1", "2", "3"] and [r.id for r in train] == ["2"]
    assert train[0].path.parent.name == "train2017" and train[0].text == "A parked car."
    assert info["parts"][0]["split"] == "train2017" and info["skipped"] == {}
    with pytest.raises(DataError, match="instances_test2017.json"):
        (root / "test2017").mkdir()
        read(split="test2017")
    with pytest.raises(UserError, match="only coco parts name a split"):
        load_records(DatasetConfig(name="e", modality="audio",
                                   parts=[DatasetPart("esc50", str(root), split="train2017")]))


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown format 'mp4'"):
        load_records(dataset("mp4", tmp_path))


def test_parts_combine_and_accept_omegaconf(tmp_path):
    make_cremad(tmp_path / "CREMA-D")
    make_esc50(tmp_path / "ESC-50")
    cfg = OmegaConf.structured(
        DatasetConfig(
            name="both",
            modality="audio",
            parts=[
                DatasetPart("esc50", str(tmp_path / "ESC-50")),
                DatasetPart("cremad", str(tmp_path / "CREMA-D")),
            ],
        )
    )
    records, info = load_records(cfg)
    assert len(records) == 9
    assert [p["format"] for p in info["parts"]] == ["esc50", "cremad"]
    ids = [r.id for r in records]
    assert ids == [r.id for r in sorted(records, key=lambda r: natural_key(r.id))]
    again, info_again = load_records(cfg)
    assert [r.id for r in again] == [r.id for r in records]
    assert info_again["fingerprint"] == info["fingerprint"]


def test_fingerprint_changes_with_content(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    _, before = load_records(dataset("esc50", root))
    write_tone(root / "audio" / "1-100032-A-0.wav", seconds=0.5, rate=44_100)
    _, after = load_records(dataset("esc50", root))
    assert before["fingerprint"] != after["fingerprint"]
