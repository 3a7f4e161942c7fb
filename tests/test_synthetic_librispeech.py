"""The generated LibriSpeech-layout corpus: the real loader reads every split, the splits are
disjoint, the clips fit the encoder window and the set is the same every time."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import soundfile as sf

from mcollapse.config import DatasetConfig, DatasetPart
from mcollapse.data import librispeech, load_records, split_config, synthetic_librispeech
from mcollapse.data.generators import generate, resolve_options
from mcollapse.errors import UserError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_fortunes = pytest.mark.skipif(not synthetic_librispeech.FORTUNES_DIR.is_dir(), reason="fortunes not installed")

SMALL = {
    "n_train_speakers": 3, "n_dev_speakers": 2, "n_test_speakers": 2,
    "n_train_sentences": 6, "n_dev_sentences": 3, "n_test_sentences": 3,
    "max_seconds": 3.0,  # low enough that some clips are redone faster
}  # fmt: skip
SPLITS = dict(zip(("train", "dev", "test"), synthetic_librispeech.SUBDIRS))
LIBRISPEECH_TEXT = re.compile(r"^[A-Z]+(?:'[A-Z]+)*(?: [A-Z]+(?:'[A-Z]+)*)*$")


def config(tmp_path, **options):
    parent = tmp_path / "synthetic_librispeech"
    part = DatasetPart(format="librispeech", root=str(parent / "test-clean"))
    splits = {key: [DatasetPart(format="librispeech", root=str(parent / subdir))]
              for key, subdir in SPLITS.items() if key != "test"}
    return DatasetConfig(name="synthetic_librispeech", modality="audio", parts=[part], splits=splits,
                         generate="synthetic_librispeech", generate_options={**SMALL, **options},
                         text_normalization="sentence")


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "generated.json"):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    assert shutil.which("espeak-ng") and synthetic_librispeech.FORTUNES_DIR.is_dir(), \
        "install espeak-ng and fortunes (the README's set-up commands do)"
    root = tmp_path_factory.mktemp("first") / "synthetic_librispeech"
    generate("synthetic_librispeech", root, SMALL)
    return root


@needs_espeak
@needs_fortunes
def test_every_split_reads_back_disjoint_and_librispeech_style(small_set):
    speakers, sentences = {}, {}
    for key, subdir in SPLITS.items():
        records, skipped = librispeech.load_part(small_set / subdir)
        assert not skipped
        n_sentences, n_speakers = SMALL[f"n_{key}_sentences"], SMALL[f"n_{key}_speakers"]
        assert len(records) == 2 * n_sentences  # utterances_per_sentence defaults to 2
        speakers[key] = {r.fields["speaker_id"] for r in records}
        sentences[key] = {r.text for r in records}
        assert len(speakers[key]) == n_speakers and len(sentences[key]) == n_sentences
        for text in sentences[key]:  # each sentence said by two different speakers
            assert len({r.fields["speaker_id"] for r in records if r.text == text}) == 2
        for record in records:
            assert LIBRISPEECH_TEXT.match(record.text), record.text
            assert 4 <= len(record.text.split()) <= 10
            info = sf.info(str(record.path))
            assert info.format == "FLAC" and info.samplerate == 16_000 and info.channels == 1
            assert info.frames <= SMALL["max_seconds"] * 16_000
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not speakers[a] & speakers[b] and not sentences[a] & sentences[b]


@needs_espeak
@needs_fortunes
def test_speakers_and_source_describe_the_set(small_set):
    rows = [line.split("|") for line in (small_set / "SPEAKERS.TXT").read_text().splitlines()
            if not line.startswith(";")]
    by_id = {row[0].strip(): (row[1].strip(), row[2].strip(), float(row[3])) for row in rows}
    assert len(by_id) == sum(SMALL[f"n_{key}_speakers"] for key in SPLITS)
    for subdir in synthetic_librispeech.SUBDIRS:
        on_disk = {p.name for p in (small_set / subdir).iterdir()}
        assert on_disk == {i for i, (_, split, _) in by_id.items() if split == subdir}
    assert all(sex in ("M", "F") and minutes > 0 for sex, _, minutes in by_id.values())

    source = json.loads((small_set / "SOURCE.json").read_text())
    assert source["package"] == "fortunes"
    sentences = synthetic_librispeech.extract_sentences(synthetic_librispeech.source_files(), 4, 10)
    assert source["sentences_available"] == len(sentences) >= 2000
    assert source["sentences_sha256"] == hashlib.sha256(("\n".join(sentences) + "\n").encode()).hexdigest()
    assert source["sentences_used"] == sum(SMALL[f"n_{key}_sentences"] for key in SPLITS)
    assert source["utterances"] == {subdir: 2 * SMALL[f"n_{key}_sentences"] for key, subdir in SPLITS.items()}


@needs_espeak
@needs_fortunes
def test_generation_is_deterministic(small_set, tmp_path):
    again = tmp_path / "synthetic_librispeech"
    generate("synthetic_librispeech", again, SMALL)
    assert tree_digest(again) == tree_digest(small_set)


@needs_espeak
@needs_fortunes
def test_load_records_generates_once_for_every_split(tmp_path):
    cfg = config(tmp_path)
    records, info = load_records(cfg)
    assert info["generated"] is True and len(records) == 6
    assert records[0].text[0].isupper() and records[0].text[1:] != records[0].text[1:].upper()
    for split, n in (("train", 12), ("dev", 6)):
        split_records, split_info = load_records(split_config(cfg, split))
        assert split_info["generated"] is False and len(split_records) == n


def test_default_options_ask_for_enough():
    options = synthetic_librispeech.DEFAULT_OPTIONS
    speakers = sum(options[f"n_{key}_speakers"] for key in SPLITS)
    assert 40 <= speakers <= len(synthetic_librispeech.VOICES) == len(set(synthetic_librispeech.VOICES))
    assert options["n_train_sentences"] * options["utterances_per_sentence"] >= 3000
    assert sum(options[f"n_{key}_sentences"] for key in SPLITS) >= 1500


@pytest.mark.parametrize("bad, message", [
    ({"n_train_speakers": 60}, "at most 56"),
    ({"utterances_per_sentence": 3}, "utterances_per_sentence must be 1..2"),
    ({"min_words": 8, "max_words": 5}, "min_words"),
])  # fmt: skip
def test_bad_options_are_one_line_user_errors(tmp_path, bad, message):
    with pytest.raises(UserError, match=message) as error:
        synthetic_librispeech._check(resolve_options("synthetic_librispeech", {**SMALL, **bad}))
    assert "\n" not in str(error.value)


@needs_fortunes
def test_too_few_sentences_is_a_user_error():
    options = resolve_options("synthetic_librispeech", {**SMALL, "n_train_sentences": 100_000})
    sentences = synthetic_librispeech.extract_sentences(synthetic_librispeech.source_files(), 4, 10)
    with pytest.raises(UserError, match="fewer than the 100006 requested") as error:
        synthetic_librispeech.plan(options, sentences)
    assert "\n" not in str(error.value)


def test_missing_fortunes_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match=r"apt-get install fortunes") as error:
        synthetic_librispeech.source_files(tmp_path / "nowhere")
    assert "\n" not in str(error.value)


def test_transcripts_are_filtered_and_normalised():
    assert synthetic_librispeech.transcript("Don't panic, my friend!") == "DON'T PANIC MY FRIEND"
    for rejected in ("It costs 5 dollars.", "Ask the FBI about it.", "See www.example.com now.",
                     "He said \"no\" loudly.", "Then came Mr."):
        assert synthetic_librispeech.transcript(rejected) is None
    assert synthetic_librispeech.transcript("I think I can.") == "I THINK I CAN"
