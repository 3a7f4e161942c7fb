"""The groups a dataset's samples share (speaker, sentence, ...), for intervals that respect them.

Samples that share a speaker or a sentence are not independent: an interval that treats them as
such is too narrow. `stats.cluster_by` names record fields; `sentence` also means the sample's text
(normalised) where the records have no such field, so LibriSpeech-layout sets group repeated
sentences too. A field no record has is dropped (and said so); a sample without a value is a
cluster of its own.
"""

from __future__ import annotations

import logging

from mcollapse.data.base import Record

log = logging.getLogger(__name__)

SENTENCE = "sentence"
SENTENCE_FIELDS = ("sentence", "sentence_code", "sentence_id")


def _value(record: Record, field: str):
    if field == SENTENCE:
        for name in SENTENCE_FIELDS:
            if record.fields.get(name) not in (None, ""):
                return record.fields[name]
        text = " ".join((record.text or "").lower().split())
        return text or None
    return record.fields.get(field)


def cluster_labels(records: list[Record], fields: list[str]) -> tuple[list[list[str]], dict]:
    """Per field, one label per record, and {field: number of clusters} for the summary."""
    labels, info = [], {}
    for field in fields:
        values = [_value(r, field) for r in records]
        if all(v is None for v in values):
            log.info("stats.cluster_by: no record has '%s'; intervals do not group by it", field)
            info[field] = None
            continue
        column = [f"{field}={v}" if v is not None else f"own:{r.id}" for r, v in zip(records, values)]
        labels.append(column)
        info[field] = len(set(column))
    return labels, info
