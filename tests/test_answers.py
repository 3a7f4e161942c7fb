"""Forced-choice answers: strict JSON reading, the lenient reading beside it, and the scores."""

from __future__ import annotations

import pytest

from mcollapse.analysis.answers import INVALID, lenient_answer, strict_answer, task_scores

CHOICES = ["anger", "happy", "neutral", "sadness"]


@pytest.mark.parametrize("text,expected", [
    ('{"answer": "happy"}', "happy"),
    ('  {"answer":"sadness"}\n', "sadness"),
    ('{"answer": "Happy"}', None),  # not verbatim
    ('{"answer": "happy", "why": "pitch"}', None),  # extra key
    ('{"answer": "joy"}', None),  # not a choice
    ('{"answer": ["happy"]}', None),
    ('["happy"]', None),
    ('The answer is {"answer": "happy"}', None),  # text around the JSON
    ('{"answer": "happy"', None),  # truncated
    ("happy", None),
    ("", None),
    ('{"answer": "<exact choice>"}', None),  # the instruction's placeholder copied back
])
def test_strict_reading_takes_only_the_exact_json(text, expected):
    assert strict_answer(text, CHOICES) == expected


@pytest.mark.parametrize("text,expected", [
    ('{"answer": "Happy "}', "happy"),
    ("The speaker sounds happy.", "happy"),
    ("NEUTRAL", "neutral"),
    ("unhappy", None),  # no substrings (the earlier code counted this as happy)
    ("happy or sadness", None),  # two choices named
    ('{"answer": "joy"}', None),
    ("", None),
])
def test_lenient_reading(text, expected):
    assert lenient_answer(text, CHOICES) == expected


def test_task_scores_count_invalid_answers_as_wrong_in_their_own_column():
    gold = ["anger", "anger", "happy", "neutral"]
    predicted = ["anger", None, "happy", "happy"]
    scores = task_scores(gold, predicted, CHOICES)
    assert scores["accuracy"] == pytest.approx(0.5) and scores["answered"] == pytest.approx(0.75)
    confusion = scores["confusion"]
    assert confusion["columns"][-1] == INVALID and confusion["rows"] == CHOICES
    counts = confusion["counts"]
    assert counts[0] == [1, 0, 0, 0, 1] and counts[1][1] == 1 and counts[2][1] == 1 and counts[3] == [0] * 5
    assert sum(map(sum, counts)) == len(gold)
    assert scores["per_class_accuracy"] == {"anger": 0.5, "happy": 1.0, "neutral": 0.0}
    with pytest.raises(ValueError):
        task_scores(gold, predicted[:2], CHOICES)
