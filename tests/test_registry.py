"""Every experiment config names a registered experiment, and an unknown name is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcollapse.errors import UserError
from mcollapse.experiments import EXPERIMENTS, experiment_module

CONF = Path(__file__).resolve().parents[1] / "conf" / "experiment"


def test_the_registry_holds_exactly_the_configured_experiments():
    assert sorted(EXPERIMENTS) == sorted(p.stem for p in CONF.glob("*.yaml"))


def test_every_registered_experiment_has_a_run():
    for name in EXPERIMENTS:
        assert callable(experiment_module(name).run), name


@pytest.mark.parametrize("name", ["nope", "common", "llm_side"])
def test_an_unknown_experiment_lists_the_known_ones(name):
    with pytest.raises(UserError, match=f"experiment '{name}' is unknown \\(known: ablation, cache, extract"):
        experiment_module(name)
