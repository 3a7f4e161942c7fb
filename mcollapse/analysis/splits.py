"""Group-disjoint train/validation/test splits (speaker-disjoint for speech).

A fine-tuned model evaluated on speakers it was trained on can score by recognising voices
rather than reading the target; holding out whole groups closes that route. Groups, not samples,
are assigned: the test and validation shares are shares of the groups (at least one each).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

PARTS = ("train", "val", "test")


def group_split(ids: list[str], groups: list[str], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """ids per part, in input order; no group appears in two parts."""
    if len(ids) != len(groups):
        raise ValueError("ids and groups differ in length")
    if not (0.0 < val < 1.0 and 0.0 < test < 1.0 and val + test < 1.0):
        raise ValueError(f"val ({val}) and test ({test}) shares must be in (0, 1) and sum below 1")
    distinct = sorted(set(groups))
    n_test = max(1, round(test * len(distinct)))
    n_val = max(1, round(val * len(distinct)))
    if len(distinct) - n_test - n_val < 1:
        raise ValueError(f"{len(distinct)} groups cannot make train, validation and test parts")
    codes = np.array([distinct.index(g) for g in groups])
    index = np.arange(len(ids))
    rest, test_part = next(GroupShuffleSplit(n_splits=1, test_size=n_test, random_state=seed)
                           .split(index, groups=codes))
    train_part, val_part = next(GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed + 1)
                                .split(rest, groups=codes[rest]))
    chosen = {"train": rest[train_part], "val": rest[val_part], "test": test_part}
    return {part: [ids[i] for i in sorted(chosen[part])] for part in PARTS}
