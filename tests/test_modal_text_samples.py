"""Modal and text probes compare the same samples: text rows of clips without a modal row are dropped, counted."""

from __future__ import annotations

import json

import numpy as np

from mcollapse.extraction.cache import Activations
from mcollapse.extraction.extract import Extraction
from mcollapse.pipeline.inputs import text_on_modal_samples
from tests.helpers import cremad_copy_with_a_corrupt_clip, only_run_dir, run_experiment


def _extraction(ids: list[str], skipped: dict[str, str] | None = None) -> Extraction:
    vectors = {"llm_final": np.arange(len(ids) * 2, dtype=np.float32).reshape(len(ids), 2)}
    return Extraction(Activations(ids, vectors, dict(skipped or {}), {}), [], key="k", skipped=dict(skipped or {}))


def test_text_rows_are_restricted_to_the_samples_with_modal_rows():
    modal = _extraction(["a", "c", "d"], skipped={"b": "unreadable"})
    text = _extraction(["a", "b", "c"], skipped={"d": "no text"})
    kept, dropped = text_on_modal_samples(modal, text)
    assert kept.activations.ids == ["a", "c"] and dropped == 1
    np.testing.assert_array_equal(kept.activations.vectors["llm_final"], [[0, 1], [4, 5]])
    assert kept.key == text.key and kept.skipped == {"d": "no text"}


def test_nothing_dropped_when_every_text_row_has_a_modal_row():
    kept, dropped = text_on_modal_samples(_extraction(["a", "b"]), _extraction(["a", "b"]))
    assert dropped == 0 and kept.activations.ids == ["a", "b"]


def test_probe_run_counts_text_rows_of_unreadable_clips(tmp_path, env):
    from tests.test_cli import SMALL_SPEECH

    cremad_copy_with_a_corrupt_clip(tmp_path, env, 30, SMALL_SPEECH)
    run_experiment(["model=tiny_qwen2audio", "dataset=cremad", f"paths.data_root={tmp_path / 'data'}",
                   "hook.roles=[adapter_output,llm_final]"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "cremad")
    counts = json.loads((run / "results.json").read_text())["counts"]
    assert counts["n_modal"] == counts["n_text"] == 29 and counts["text_rows_without_modal_dropped"] == 1
