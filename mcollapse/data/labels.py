"""Label rules: which class each record gets for each information type a probe tests.

Labels are derived over exactly the records given (normally the selected ones), so the lexical
vocabulary and the tertile thresholds describe the samples that are probed. A value of None
means "no label": the probe leaves the record out. The same rules are written up for readers in
docs/labels.md.

* lexical, rule `reference` (the paper's rule, kept for comparability): lowercase the text, take
  tokens as maximal runs of [a-z] ("it's" -> "it", "s"; digits dropped), count them over all
  records, keep the `top_k` most frequent (ties: the token seen first wins). A record's label is
  the first token of its text, in reading order, that is in that set; None when none is.
  The label is mostly a function word ("the", "a", "i"), which is why the rule is reported
  as what it is and not as "the most salient word".
* lexical, rule `sentence`: the whole text normalised the same way (lowercase, [a-z]+ tokens
  joined by single spaces). Meant for fixed-sentence corpora (CREMA-D: 12 classes).
* speaker <- field speaker_id; emotion <- emotion; acoustic <- sound_class;
  object_category <- object_category; super_category <- super_category (as the loaders set them).
* object_count: bins "1", "2-4", "5-10", "11+"; 0 objects -> None (the reference put empty
  images into "1").
* object_size (field avg_object_size) and spatial_spread: tertiles over the records that have
  the value, thresholds t1, t2 = the 33.3rd and 66.7th percentiles (numpy linear
  interpolation); value <= t1 -> low, <= t2 -> middle, else high. Names: small/medium/large
  and concentrated/moderate/dispersed. Records without the value (no objects; fewer than two
  objects for spread) get None, instead of the reference's 0 that piled them into the lowest bin.

An info type whose field no record has (or whose values are all unusable) comes back with every
value None and `skipped_reason` set, so callers can report why it was not probed. Minimum class
sizes and sample counts are the probe's business, not the label rules'.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mcollapse.data.base import Record
from mcollapse.errors import UserError

_TOKEN = re.compile(r"[a-z]+")

# info type -> record field it is read from ("text" means Record.text)
INFO_TYPE_FIELDS = {
    "lexical": "text",
    "speaker": "speaker_id",
    "emotion": "emotion",
    "acoustic": "sound_class",
    "object_category": "object_category",
    "super_category": "super_category",
    "object_count": "object_count",
    "object_size": "avg_object_size",
    "spatial_spread": "spatial_spread",
}
LEXICAL_RULES = ("reference", "sentence")
COUNT_BINS = ((1, 1, "1"), (2, 4, "2-4"), (5, 10, "5-10"), (11, None, "11+"))
TERTILE_NAMES = {
    "object_size": ("small", "medium", "large"),
    "spatial_spread": ("concentrated", "moderate", "dispersed"),
}


@dataclass
class LabelColumn:
    """One info type's labels, aligned with the records they were derived from."""

    values: list[str | None]
    rule: str
    skipped_reason: str | None = None

    @property
    def n_labelled(self) -> int:
        return sum(v is not None for v in self.values)

    def class_counts(self) -> dict[str, int]:
        """Labelled records per class, most frequent first."""
        return dict(Counter(v for v in self.values if v is not None).most_common())


def tokens(text: str | None) -> list[str]:
    """Lowercase [a-z]+ runs, the tokenisation both lexical rules share."""
    return _TOKEN.findall(text.lower()) if text else []


def top_tokens(texts: list[str | None], top_k: int) -> list[str]:
    """The `top_k` most frequent tokens; equal counts keep first-occurrence order."""
    counts = Counter(t for text in texts for t in tokens(text))  # insertion order = first seen
    ranked = sorted(counts, key=lambda token: -counts[token])  # stable sort keeps that order
    return ranked[:top_k]


def lexical_reference(texts: list[str | None], top_k: int) -> list[str | None]:
    """First token in reading order that is among the corpus's `top_k` most frequent."""
    vocabulary = set(top_tokens(texts, top_k))
    return [next((t for t in tokens(text) if t in vocabulary), None) for text in texts]


def lexical_sentence(texts: list[str | None]) -> list[str | None]:
    """The whole normalised text as one class."""
    return [" ".join(tokens(text)) or None for text in texts]


def count_bin(count) -> str | None:
    """The count's bin (1, 2-4, 5-10, 11+); None for no objects or no count."""
    if count is None or int(count) < 1:
        return None
    n = int(count)
    return next(name for low, high, name in COUNT_BINS if n >= low and (high is None or n <= high))


def tertile_bins(values: list, names: tuple[str, str, str]) -> list[str | None]:
    """Low/middle/high by the 33.3rd and 66.7th percentiles of the values that are present."""
    present = np.array([float(v) for v in values if v is not None], dtype=float)
    if present.size == 0:
        return [None] * len(values)
    low, high = np.percentile(present, [100 / 3, 200 / 3])
    return [
        None if v is None else names[0] if v <= low else names[1] if v <= high else names[2]
        for v in values
    ]


def _field_values(records: list[Record], field_name: str) -> list:
    if field_name == "text":
        return [r.text for r in records]
    return [r.fields.get(field_name) for r in records]


def _label_one(info_type: str, raw: list, lexical_rule: str, top_k: int) -> tuple[list, str]:
    if info_type == "lexical":
        if lexical_rule == "reference":
            return lexical_reference(raw, top_k), f"lexical/reference: first of top-{top_k} words"
        return lexical_sentence(raw), "lexical/sentence: normalised whole text"
    if info_type == "object_count":
        return [count_bin(v) for v in raw], "object_count: bins 1, 2-4, 5-10, 11+ (0 -> none)"
    if info_type in TERTILE_NAMES:
        names = TERTILE_NAMES[info_type]
        return tertile_bins(raw, names), f"{info_type}: tertiles {'/'.join(names)}"
    field_name = INFO_TYPE_FIELDS[info_type]
    values = [None if v is None or str(v) == "" else str(v) for v in raw]
    return values, f"{info_type}: {field_name}"


def derive_labels(
    records: list[Record],
    info_types: list[str],
    lexical_rule: str = "reference",
    top_k: int = 50,
) -> dict[str, LabelColumn]:
    """Info type -> LabelColumn aligned with `records` (rules in the module docstring)."""
    unknown = [t for t in info_types if t not in INFO_TYPE_FIELDS]
    if unknown:
        raise UserError(
            f"unknown info type(s) {', '.join(unknown)}; known: {', '.join(INFO_TYPE_FIELDS)}"
        )
    if lexical_rule not in LEXICAL_RULES:
        raise UserError(f"unknown lexical_rule {lexical_rule!r}; known: {', '.join(LEXICAL_RULES)}")
    columns: dict[str, LabelColumn] = {}
    for info_type in info_types:
        field_name = INFO_TYPE_FIELDS[info_type]
        raw = _field_values(records, field_name)
        if all(v is None for v in raw):
            reason = f"no record has field {field_name!r}"
            columns[info_type] = LabelColumn([None] * len(records), info_type, reason)
            continue
        values, rule = _label_one(info_type, raw, lexical_rule, top_k)
        reason = None if any(v is not None for v in values) else f"no usable {field_name!r} value"
        columns[info_type] = LabelColumn(values, rule, reason)
    return columns
