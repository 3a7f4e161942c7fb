"""dataset.text_normalization: LibriSpeech's upper-case transcripts in sentence case, and in the cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mcollapse.cli import config_dir
from mcollapse.config import DatasetConfig
from mcollapse.data import load_records
from mcollapse.data.text import normalize_text
from mcollapse.errors import UserError
from tests.test_data_loaders import dataset, make_librispeech


@pytest.mark.parametrize("raw,expected", [
    ("HE DIDN'T GO TO PARIS", "He didn't go to paris"),
    ("I THINK I'M LATE AND I'LL RUN", "I think I'm late and I'll run"),
    ("SO I SAID I'D GO IF I'VE TIME", "So I said I'd go if I've time"),
    ("IT IS MINE O I SEE", "It is mine o I see"),
    ("IN IT IS ICE", "In it is ice"),  # "i" only alone, not inside words
    ("'TWAS THE NIGHT", "'Twas the night"),  # the first letter, past leading punctuation
])
def test_sentence_case_keeps_apostrophes_and_the_pronoun_i(raw, expected):
    assert normalize_text(raw, "sentence") == expected


def test_none_keeps_the_text_as_written():
    assert normalize_text("HE DIDN'T GO", "none") == "HE DIDN'T GO"


def test_librispeech_transcripts_are_normalised_when_loaded_and_change_the_fingerprint(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech" / "test-clean")
    raw, info_raw = load_records(dataset("librispeech", root, text_normalization="none"))
    cased, info_cased = load_records(dataset("librispeech", root, text_normalization="sentence"))
    assert raw[2].text == "HE HOPED THERE WOULD BE STEW 0"
    assert cased[2].text == "He hoped there would be stew 0"
    assert [r.id for r in raw] == [r.id for r in cased]
    assert info_raw["fingerprint"] != info_cased["fingerprint"]  # every cache keyed by it changes


def test_unknown_rule_is_a_user_error(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech" / "test-clean")
    with pytest.raises(UserError, match="text_normalization"):
        load_records(dataset("librispeech", root, text_normalization="lower"))


def test_librispeech_defaults_to_sentence_and_the_others_to_none():
    def load(name):
        loaded = OmegaConf.load(Path(config_dir()) / "dataset" / f"{name}.yaml")
        loaded.pop("defaults", None)
        return OmegaConf.merge(OmegaConf.structured(DatasetConfig), loaded)

    assert load("librispeech").text_normalization == "sentence"
    for name in ("cremad", "esc50", "coco", "synthetic_speech", "synthetic_vision"):
        assert load(name).text_normalization == "none"
