"""experiment=lora end to end on the tiny twins: split, training, evaluation, re-extraction, probes,
and the saved adapter used by another experiment through model.lora (in-process, see run_experiment)."""

from __future__ import annotations

import csv
import json

import pytest

from tests.helpers import only_run_dir, run_experiment

SPEECH = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=5",
          "dataset.generate_options.n_sentences=6", "dataset.generate_options.n_per_class=4"]
TRAIN = ["lora.epochs=2", "lora.batch_size=8", "lora.grad_accum=1", "lora.lr=1e-3", "experiment.max_new_tokens=8"]


def _results(run):
    return json.loads((run / "results.json").read_text())


def test_lora_on_speech_trains_evaluates_and_probes_the_held_out_speakers(tmp_path, env):
    run_experiment(["experiment=lora", *SPEECH, *TRAIN], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "lora" / "tiny_qwen2audio" / "synthetic_speech")
    results = _results(run)
    s = results["summary"]
    assert s["label"] == "emotion" and s["objective"] == "task" and s["choices"] == ["anger", "happy", "neutral",
                                                                                     "sadness"]
    split = json.loads((run / "split.json").read_text())
    speakers = {part: {i.split("_")[0] for i in split[part]["ids"]} for part in ("train", "val", "test")}
    assert not speakers["train"] & speakers["test"] and not speakers["val"] & speakers["test"]
    assert not speakers["train"] & speakers["val"] and sum(map(len, speakers.values())) == 5
    assert s["split"]["test"]["n"] == len(split["test"]["ids"]) == 24
    assert results["counts"]["n_without_label_or_group"] == 20  # the ESC-50-layout sounds have no emotion

    training = s["training"]
    assert training["epochs_run"] == 2 and training["optimizer_steps"] == 2 * 9 and training["trainable_parameters"]
    assert training["reloaded_best_val_loss"] == pytest.approx(training["best_val_loss"], rel=1e-6)
    assert training["precision"] == "float32" and training["resumed_at_epoch"] == 0
    for condition in ("base", "lora"):
        task = s["task"][condition]
        assert task["n"] == 24 and 0 <= task["accuracy"] <= task["lenient_accuracy"] <= 1
        assert sum(map(sum, task["confusion"]["counts"])) == 24
    assert s["upstream_max_abs_difference"] == {"encoder_output": 0.0, "adapter_output": 0.0}
    changes = s["probe_changes"]
    assert changes["emotion"]["llm_final"]["targeted"] and not changes["lexical"]["llm_final"]["targeted"]
    assert "speaker" in str(s["probe_skipped"])  # one held-out speaker: nothing to tell apart
    with (run / "predictions.csv").open() as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == 48 and {p["condition"] for p in predictions} == {"base", "lora"}
    for name in ("confusion.png", "training.png", "probe_changes.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "meta.json", "results.csv"):
        assert (run / name).is_file(), name
    conditions = {r.get("condition") for r in csv.DictReader((run / "results.csv").open())}
    assert conditions == {"base", "lora"}

    # any experiment runs on the LoRA model; its activations get their own cache entry
    (tmp_path / "probe").mkdir()
    run_experiment(["experiment=probe", *SPEECH, "dataset.max_samples=60", f"model.lora={run / 'adapter'}"],
                   tmp_path / "probe", env)
    probe = _results(only_run_dir(tmp_path / "probe" / "outputs" / "probe" / "tiny_qwen2audio" / "synthetic_speech"))
    assert probe["counts"]["modal_rows_computed"] == 60
    # LLM-side results of the LoRA model never come from the base model's cache entries
    for name, extra in (("base", []), ("tuned", [f"model.lora={run / 'adapter'}"])):
        (tmp_path / name).mkdir()
        run_experiment(["experiment=lipschitz", *SPEECH, "dataset.max_samples=40", *extra], tmp_path / name, env)
    runs = {name: _results(only_run_dir(tmp_path / name / "outputs" / "lipschitz" / "tiny_qwen2audio" /
                                        "synthetic_speech")) for name in ("base", "tuned")}
    assert runs["tuned"]["counts"]["gradients_batches_from_cache"] == 0
    assert runs["tuned"]["counts"]["sequence_rows_computed"] == 0  # adapter outputs are shared
    assert runs["tuned"]["summary"]["L_mean"] != runs["base"]["summary"]["L_mean"]


def test_text_objective_control_on_images(tmp_path, env):
    args = ["experiment=lora", "model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=120",
            "experiment.label=super_category", "experiment.group_by=null", "experiment.objective=text",
            "lora.epochs=1", "lora.batch_size=8", "experiment.max_new_tokens=6"]
    run_experiment(args, tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "lora" / "tiny_llava" / "synthetic_vision")
    s = _results(run)["summary"]
    assert s["objective"] == "text" and s["group_by"] is None
    test = s["split"]["test"]
    assert test["n"] == test["groups"] and test["n"] >= 20  # every image its own group
    assert s["training"]["epochs_run"] == 1 and s["task"]["lora"]["n"] == test["n"]
    assert all(entry["targeted"] for entry in s["probe_changes"]["super_category"].values())


def test_lora_refuses_what_it_cannot_do(tmp_path, env):
    """Each refusal is a UserError, which the CLI prints as one line (test_cli checks that line)."""
    bad = run_experiment(["experiment=lora", *SPEECH, "experiment.label=colour"], tmp_path, env, check=False)
    assert bad.exit_code == 2 and "colour" in bad.error
    text_only = run_experiment(["experiment=lora", "model=tiny_llama", "dataset=synthetic_speech"], tmp_path, env,
                               check=False)
    assert text_only.exit_code == 2 and "text-only" in text_only.error
