"""Choosing which records an experiment uses: deterministic, and stratified when asked.

The reference code took "the first n in loader order", which for LibriSpeech meant the first few
speakers and for ESC-50 fold 1 only. Here the choice depends only on the record ids, the field
values and the seed: never on the order a filesystem lists files. Each class draws from its own
seeded permutation, so a larger `max_samples` selects a superset of a smaller one.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict

import numpy as np

from mcollapse.data.base import Record
from mcollapse.errors import UserError

MISSING = "<missing>"  # stratum of records that lack the stratification field
_DIGITS = re.compile(r"(\d+)")


def natural_key(record_id: str) -> tuple:
    """Sort key that orders numeric runs by value ("9" < "10"), so COCO ids sort as numbers."""
    return tuple(
        (0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk)
        for chunk in _DIGITS.split(record_id)
        if chunk
    )


def _permutation(seed: int, stratum: str, n: int) -> np.ndarray:
    """A permutation that depends only on the seed and the stratum's name."""
    return np.random.default_rng([seed, zlib.crc32(stratum.encode("utf-8"))]).permutation(n)


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Proportional allocation of `total` over strata, at least 1 each when total allows.

    Largest-remainder rounding; ties go to the larger stratum, then to the first name in sort
    order (`max` keeps the first of equal keys).
    """
    population = sum(sizes.values())
    names = sorted(sizes)
    quotas = {s: total * sizes[s] / population for s in names}
    floor_one = total >= len(names)
    counts = {s: min(sizes[s], max(int(quotas[s]), 1 if floor_one else 0)) for s in names}
    while sum(counts.values()) > total:  # the floor of 1 can overshoot: trim the largest
        over = [s for s in names if counts[s] > 1]
        counts[max(over, key=lambda s: (counts[s] - quotas[s], counts[s]))] -= 1
    while sum(counts.values()) < total:
        open_strata = [s for s in names if counts[s] < sizes[s]]
        counts[max(open_strata, key=lambda s: (quotas[s] - counts[s], sizes[s]))] += 1
    return counts


def select(
    records: list[Record], max_samples: int | None, stratify_by: str | None, seed: int
) -> list[Record]:
    """At most `max_samples` records, sorted by id; stratified by a field when one is named."""
    ordered = sorted(records, key=lambda r: natural_key(r.id))
    if max_samples is None or max_samples >= len(ordered):
        return ordered
    if max_samples <= 0:
        raise UserError(f"max_samples must be positive, got {max_samples}")
    if not stratify_by:
        chosen = _permutation(seed, "", len(ordered))[:max_samples]
        return [ordered[i] for i in sorted(chosen)]
    if not any(stratify_by in r.fields for r in ordered):
        known = sorted({k for r in ordered for k in r.fields})
        raise UserError(
            f"stratify_by={stratify_by!r} is not a record field (fields: {', '.join(known)})"
        )
    strata: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(ordered):
        value = record.fields.get(stratify_by)
        strata[MISSING if value is None else str(value)].append(index)
    counts = allocate({s: len(members) for s, members in strata.items()}, max_samples)
    chosen_indices: list[int] = []
    for stratum, members in strata.items():
        order = _permutation(seed, stratum, len(members))[: counts[stratum]]
        chosen_indices.extend(members[i] for i in order)
    return [ordered[i] for i in sorted(chosen_indices)]
