"""Label rules on hand-made records (the rules are documented in docs/labels.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcollapse.data import Record, derive_labels
from mcollapse.data.labels import count_bin, lexical_reference, tertile_bins, tokens, top_tokens
from mcollapse.errors import UserError


def rec(text=None, **fields):
    return Record(id=str(id(fields)), path=Path("x"), modality="image", text=text, fields=fields)


def test_tokens_lowercase_letter_runs():
    assert tokens("It's 11 O'Clock!") == ["it", "s", "o", "clock"]
    assert tokens(None) == []


def test_top_tokens_ties_keep_first_occurrence():
    texts = ["b c", "a c", "a b"]  # a, b, c all appear twice; b is seen first, then c, then a
    assert top_tokens(texts, 3) == ["b", "c", "a"]
    assert top_tokens(texts, 2) == ["b", "c"]


def test_reference_rule_first_top_word_in_reading_order():
    texts = [
        "The dog runs",  # the: 3, dog: 2, runs: 1
        "A dog sleeps",  # a: 1
        "The cat sleeps",  # cat: 1, sleeps: 2
        "the end",  # end: 1
        "zebra",
        None,
    ]
    # top-2: "the" (3), then "dog" and "sleeps" tie at 2 -> "dog" was seen first
    assert lexical_reference(texts, 2) == ["the", "dog", "the", "the", None, None]
    # top-3 adds "sleeps"; reading order decides, not frequency
    assert lexical_reference(texts, 3)[1] == "dog"


def test_sentence_rule_normalises_whole_text():
    records = [rec("It's eleven o'clock"), rec("IT'S  ELEVEN O'CLOCK!"), rec("")]
    column = derive_labels(records, ["lexical"], lexical_rule="sentence")["lexical"]
    assert column.values == ["it s eleven o clock", "it s eleven o clock", None]


def test_count_bins():
    assert [count_bin(n) for n in (0, 1, 2, 4, 5, 10, 11, 40, None)] == [
        None, "1", "2-4", "2-4", "5-10", "5-10", "11+", "11+", None,
    ]  # fmt: skip


def test_tertiles_over_present_values():
    values = [1, 2, 3, 4, 5, 6, None, 7, 8, 9]
    # thresholds: 33.3rd and 66.7th percentiles of 1..9 = 11/3 and 19/3
    assert tertile_bins(values, ("lo", "mid", "hi")) == [
        "lo", "lo", "lo", "mid", "mid", "mid", None, "hi", "hi", "hi",
    ]  # fmt: skip


def test_image_info_types_from_fields():
    records = [
        rec("a cat", object_category="cat", super_category="animal", object_count=1,
            avg_object_size=0.5),
        rec("two dogs", object_category="dog", super_category="animal", object_count=2,
            avg_object_size=0.1, spatial_spread=0.3),
        rec("many cars", object_category="car", super_category="vehicle", object_count=12,
            avg_object_size=0.01, spatial_spread=0.05),
        rec("nothing", object_count=0),
    ]  # fmt: skip
    labels = derive_labels(
        records,
        ["object_category", "super_category", "object_count", "object_size", "spatial_spread"],
    )
    assert labels["object_category"].values == ["cat", "dog", "car", None]
    assert labels["super_category"].class_counts() == {"animal": 2, "vehicle": 1}
    assert labels["object_count"].values == ["1", "2-4", "11+", None]
    assert labels["object_size"].values == ["large", "medium", "small", None]
    assert labels["spatial_spread"].values == [None, "dispersed", "concentrated", None]
    assert all(column.skipped_reason is None for column in labels.values())


def test_speech_info_types_and_skipped_reason():
    records = [
        Record(
            id="1",
            path=Path("a"),
            modality="audio",
            text="HELLO THERE",
            fields={"speaker_id": "19"},
        ),
        Record(
            id="2",
            path=Path("b"),
            modality="audio",
            text="THERE IT IS",
            fields={"speaker_id": "26"},
        ),
    ]
    labels = derive_labels(records, ["lexical", "speaker", "emotion"], top_k=1)
    assert labels["lexical"].values == ["there", "there"]
    assert labels["speaker"].values == ["19", "26"]
    assert labels["emotion"].values == [None, None]
    assert labels["emotion"].skipped_reason == "no record has field 'emotion'"
    assert labels["speaker"].n_labelled == 2


def test_object_count_all_zero_is_skipped():
    labels = derive_labels([rec(object_count=0), rec(object_count=0)], ["object_count"])
    assert labels["object_count"].skipped_reason is not None


def test_unknown_info_type_and_rule_are_user_errors():
    with pytest.raises(UserError, match="colour"):
        derive_labels([rec("a")], ["colour"])
    with pytest.raises(UserError, match="salient"):
        derive_labels([rec("a")], ["lexical"], lexical_rule="salient")
