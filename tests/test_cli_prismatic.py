"""LoRA on the Prismatic twin through the CLI (its probes and decoder-side experiments run in the paper
grid, test_cli_paper)."""

from __future__ import annotations

import json

from tests.helpers import only_run_dir, run_experiment

MODEL = "tiny_prismatic"


def _summary(root, experiment):
    run = only_run_dir(root / "outputs" / experiment / MODEL / "synthetic_vision")
    return run, json.loads((run / "results.json").read_text())


def test_lora_on_the_prismatic_twin(tmp_path, env):
    run_experiment(["experiment=lora", f"model={MODEL}", "dataset=synthetic_vision", "dataset.max_samples=120",
                   "experiment.label=super_category", "experiment.group_by=null", "lora.epochs=1", "lora.batch_size=8",
                   "experiment.max_new_tokens=6"], tmp_path, env)
    run, results = _summary(tmp_path, "lora")
    s = results["summary"]
    assert s["training"]["epochs_run"] == 1 and s["task"]["lora"]["n"] == s["split"]["test"]["n"] >= 20
    assert s["upstream_max_abs_difference"] == {"encoder_output": 0.0, "adapter_output": 0.0}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
