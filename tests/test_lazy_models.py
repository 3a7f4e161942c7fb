"""A warm re-run asks the store first and loads no model; anything that changes a key loads again."""

from __future__ import annotations

import json

import pytest

from mcollapse.pipeline import inputs, lazy
from tests.helpers import model_cfg, only_run_dir, run_experiment

SPEECH = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
          "dataset.generate_options.n_per_class=8", "dataset.max_samples=96"]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _run(tmp_path, env, name, overrides=()):
    (tmp_path / name).mkdir()
    run_experiment([*SPEECH, *overrides], tmp_path / name, env)
    run = only_run_dir(tmp_path / name / "outputs" / "probe" / "tiny_qwen2audio" / "synthetic_speech")
    return json.loads((run / "results.json").read_text()), json.loads((run / "meta.json").read_text())


def _counting_loads(monkeypatch) -> list:
    loads = []
    real = inputs.load_model

    def counted(*args, **kwargs):
        loads.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs, "load_model", counted)
    return loads


def test_warm_rerun_loads_no_model_and_gives_the_same_rows(tmp_path, env, monkeypatch):
    cold, cold_meta = _run(tmp_path, env, "cold")

    def refuse(*args, **kwargs):
        raise AssertionError("a warm re-run loaded a model")

    monkeypatch.setattr(inputs, "load_model", refuse)
    warm, warm_meta = _run(tmp_path, env, "warm")
    assert warm["rows"] == cold["rows"]
    assert warm["summary"]["hooks"] == cold["summary"]["hooks"]
    assert warm_meta["counts"]["model_loaded"] is False
    assert warm_meta["counts"]["modal_rows_computed"] == 0
    assert warm_meta["checkpoint"] == cold_meta["checkpoint"]


@pytest.mark.parametrize("change", [["hook.llm_layer=3"], ["model.prompt=Listen to this clip."]])
def test_a_change_to_the_key_loads_the_model_again(tmp_path, env, monkeypatch, change):
    _run(tmp_path, env, "warmup")
    loads = _counting_loads(monkeypatch)
    _, meta = _run(tmp_path, env, "changed", change)
    assert loads == ["tiny_qwen2audio"]
    assert meta["counts"]["model_loaded"] is True
    _, again = _run(tmp_path, env, "again", change)  # now recorded and cached under the new key
    assert loads == ["tiny_qwen2audio"] and again["counts"]["model_loaded"] is False


def test_a_second_text_model_always_loads(tmp_path, env, monkeypatch):
    """Only the run's own model has a recorded identity; a text baseline is another model."""
    _run(tmp_path, env, "warmup", ["experiment.text.source=none"])
    loads = _counting_loads(monkeypatch)
    _, meta = _run(tmp_path, env, "none", ["experiment.text.source=none"])
    assert loads == [] and meta["counts"]["model_loaded"] is False
    _, meta = _run(tmp_path, env, "baseline", ["experiment.text.source=tiny_llama"])
    assert loads == ["tiny_qwen2audio", "tiny_llama"] and meta["counts"]["model_loaded"] is True


def test_only_a_pinned_revision_a_local_or_a_built_model_is_trusted(tmp_path):
    hook = type("Hook", (), {"roles": ["llm_final"], "llm_layer": 16})()
    fields = lambda **over: lazy.config_fields(model_cfg("qwen2audio", **over), hook, "cpu", tmp_path)  # noqa: E731
    assert fields(revision="main") is None
    assert fields(revision=None) is None
    assert fields(revision=SHA[:12]) is None  # a short sha may become ambiguous: not a pin
    assert fields(revision=SHA) is not None
    assert fields(revision=SHA) != fields(revision="f" * 40)
    assert fields(revision="main", local_path=str(tmp_path)) is not None
    assert lazy.config_fields(model_cfg("tiny_qwen2audio"), hook, "cpu", tmp_path)["build"].startswith(
        "tiny_qwen2audio-")


def test_a_hub_model_is_served_without_loading_only_under_a_pinned_revision(tmp_path, env, monkeypatch):
    """The built checkpoint stands in for a hub download (from_pretrained takes a directory as hub id)."""
    _, meta = _run(tmp_path, env, "built")
    as_hub = ["model.build=null", f"model.hub_id={meta['checkpoint']}"]
    loads = _counting_loads(monkeypatch)
    for n in range(2):
        _, meta = _run(tmp_path, env, f"main{n}", [*as_hub, "model.revision=main"])
        assert meta["counts"]["model_loaded"] is True
    assert len(loads) == 2
    for n in range(2):
        _, meta = _run(tmp_path, env, f"pinned{n}", [*as_hub, f"model.revision={SHA}"])
    assert len(loads) == 3 and meta["counts"]["model_loaded"] is False
