"""experiment=transfer on the twins: per-layer transfer matrices across models and inputs."""

from __future__ import annotations

import json

from tests.helpers import only_run_dir, run_experiment


def _summary(run):
    return json.loads((run / "results.json").read_text())["summary"]


def test_transfer_across_models_and_inputs_on_images(tmp_path, env):
    run_experiment(["experiment=transfer", "model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=40",
                    "experiment.other_model=tiny_llama", "probe.seeds=[1,2]"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "transfer" / "tiny_llava" / "synthetic_vision")
    s = _summary(run)
    assert s["settings"] == ["main/modal", "main/text", "other/text"]
    assert s["hooks"][0] == "llm_hs_0" and len(s["hooks"]) == 19  # 18 blocks + the input
    first = s["transfer"]["object_category"]["llm_hs_5"]
    assert {"main/text->main/modal", "main/modal->main/text", "main/text->other/text"} <= set(first["accuracy"])
    assert all(0.0 <= v <= 1.0 for v in first["accuracy"].values())
    assert -1.0 <= first["direction_cosine"]["main/text|other/text"] <= 1.0
    modality = s["modality"]["main"]["llm_hs_5"]
    assert 0.0 <= modality["shuffled_control"] <= 1.0
    assert (run / "transfer.png").stat().st_size > 0 and (run / "meta.json").is_file()
    assert "transfer_accuracy" in (run / "results.csv").read_text()


def test_transfer_on_speech_uses_lexical(tmp_path, env):
    run_experiment(["experiment=transfer", "model=tiny_qwen2audio", "dataset=synthetic_speech",
                    "dataset.max_samples=40", "hook.llm_layers=[0,8,-1]", "probe.seeds=[1]"], tmp_path, env)
    s = _summary(only_run_dir(tmp_path / "outputs" / "transfer" / "tiny_qwen2audio" / "synthetic_speech"))
    assert s["hooks"] == ["llm_hs_0", "llm_hs_8", "llm_hs_18"]
    assert "lexical" in s["transfer"] and "main/modal->main/text" in s["transfer"]["lexical"]["llm_hs_8"]["accuracy"]
