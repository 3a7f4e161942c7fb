"""Group-disjoint (speaker-disjoint) train / validation / test splits."""

from __future__ import annotations

import pytest

from mcollapse.analysis.splits import PARTS, group_split


def _data(n_groups=10, per_group=6):
    ids = [f"s{g}_{k}" for g in range(n_groups) for k in range(per_group)]
    return ids, [i.split("_")[0] for i in ids]


def test_no_group_straddles_two_parts_and_every_id_is_placed_once():
    ids, groups = _data()
    split = group_split(ids, groups, val=0.1, test=0.2, seed=42)
    group_of = dict(zip(ids, groups))
    owners = {part: {group_of[i] for i in split[part]} for part in PARTS}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert len(owners["test"]) == 2 and len(owners["val"]) == 1 and len(owners["train"]) == 7
    assert all(split[p] == [i for i in ids if i in set(split[p])] for p in PARTS)  # input order kept


def test_split_is_a_function_of_the_seed():
    ids, groups = _data()
    assert group_split(ids, groups, 0.1, 0.2, 42) == group_split(ids, groups, 0.1, 0.2, 42)
    assert group_split(ids, groups, 0.1, 0.2, 42) != group_split(ids, groups, 0.1, 0.2, 43)


def test_small_shares_still_hold_out_one_group_each():
    ids, groups = _data(n_groups=3)
    split = group_split(ids, groups, val=0.01, test=0.01, seed=0)
    assert all(len(split[p]) == 6 for p in PARTS)


@pytest.mark.parametrize("n_groups,val,test", [(2, 0.1, 0.2), (5, 0.5, 0.5), (5, 0.0, 0.2)])
def test_impossible_splits_are_refused(n_groups, val, test):
    ids, groups = _data(n_groups=n_groups)
    with pytest.raises(ValueError):
        group_split(ids, groups, val, test, 0)
