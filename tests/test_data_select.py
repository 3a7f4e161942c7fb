"""select(): deterministic, independent of input order, proportional per class when stratified."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from mcollapse.data import Record, select
from mcollapse.data.selection import allocate, natural_key
from mcollapse.errors import UserError


def make_records(sizes: dict[str, int]) -> list[Record]:
    records = []
    for label, n in sizes.items():
        for i in range(n):
            rid = f"{label}-{i}"
            records.append(
                Record(id=rid, path=Path(f"{rid}.wav"), modality="audio", fields={"emotion": label})
            )
    return records


def ids(records):
    return [r.id for r in records]


def test_same_seed_same_choice_whatever_the_input_order():
    records = make_records({"anger": 40, "happy": 30, "sad": 20, "fear": 10})
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    for stratify in (None, "emotion"):
        first = select(records, 25, stratify, seed=42)
        assert ids(first) == ids(select(shuffled, 25, stratify, seed=42))
        assert ids(first) == sorted(ids(first), key=natural_key)
        assert len(first) == 25
    assert ids(select(records, 25, None, seed=42)) != ids(select(records, 25, None, seed=43))


def test_stratified_is_proportional_with_at_least_one_per_class():
    records = make_records({"anger": 60, "happy": 30, "sad": 9, "fear": 1})
    counts = Counter(r.fields["emotion"] for r in select(records, 20, "emotion", seed=0))
    assert counts == {"anger": 12, "happy": 6, "sad": 1, "fear": 1}


def test_larger_budget_selects_a_superset():
    records = make_records({"anger": 50, "happy": 50})
    small = set(ids(select(records, 10, "emotion", seed=5)))
    large = set(ids(select(records, 30, "emotion", seed=5)))
    assert small <= large


def test_no_limit_returns_everything_sorted():
    records = make_records({"b": 3, "a": 12})
    chosen = select(list(reversed(records)), None, "emotion", seed=0)
    assert ids(chosen) == sorted(ids(records), key=natural_key)
    assert ids(chosen)[9:13] == ["a-9", "a-10", "a-11", "b-0"]


def test_records_without_the_field_form_their_own_stratum():
    records = make_records({"anger": 10}) + [Record(id="x-0", path=Path("x"), modality="audio")] * 1
    chosen = select(records, 5, "emotion", seed=0)
    assert "x-0" in ids(chosen) and len(chosen) == 5


def test_unknown_stratify_field_is_a_user_error():
    with pytest.raises(UserError, match="speaker_id"):
        select(make_records({"a": 5}), 2, "speaker_id", seed=0)


def test_allocate_when_budget_is_below_the_number_of_classes():
    counts = allocate({"a": 50, "b": 30, "c": 10, "d": 10}, 2)
    assert counts == {"a": 1, "b": 1, "c": 0, "d": 0}


def test_allocate_respects_class_sizes():
    counts = allocate({"a": 2, "b": 100}, 50)
    assert counts["a"] <= 2 and sum(counts.values()) == 50


def test_natural_key_orders_numbers_by_value():
    assert sorted(["10", "9", "100", "1"], key=natural_key) == ["1", "9", "10", "100"]
