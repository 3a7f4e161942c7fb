"""The Prismatic twin through the CLI: probes, the decoder-side experiments and LoRA, on the synthetic COCO set."""

from __future__ import annotations

import json

from tests.helpers import mcollapse, only_run_dir

MODEL = "tiny_prismatic"
VISION = [f"model={MODEL}", "dataset=synthetic_vision", "dataset.max_samples=40"]
HOOKS = ["encoder_output", "adapter_output", "llm_layer_16", "llm_final"]


def _summary(root, experiment):
    run = only_run_dir(root / "outputs" / experiment / MODEL / "synthetic_vision")
    return run, json.loads((run / "results.json").read_text())


def test_experiments_run_end_to_end_on_the_prismatic_twin(tmp_path, env):
    mcollapse(["experiment=probe", *VISION], tmp_path, env)
    _, results = _summary(tmp_path, "probe")
    probes = results["summary"]["probes"]
    assert results["summary"]["hooks"] == HOOKS
    assert {"object_category", "super_category"} <= set(probes["modal"])
    assert set(probes["modal"]["super_category"]) == set(HOOKS) and "llm_final" in probes["text"]["lexical"]

    mcollapse(["experiment=lipschitz", *VISION], tmp_path, env)
    _, results = _summary(tmp_path, "lipschitz")
    s = results["summary"]
    assert s["target"] == "content" and s["n_samples"] > 10 and 0 < s["L_median"] <= s["L_max"]

    mcollapse(["experiment=modes", *VISION], tmp_path, env)
    run, results = _summary(tmp_path, "modes")
    modes = results["summary"]
    assert modes["n_ms"] + modes["n_ta"] == modes["n_modes"] and results["counts"]["sequence_rows_computed"] == 0
    choice = [f"experiment.basis={run / 'eigenbasis.npz'}"] if modes["n_ms"] else ["experiment.ms_threshold=50"]

    mcollapse(["experiment=ablation", *VISION, "experiment.n_random=2", *choice], tmp_path, env)
    _, results = _summary(tmp_path, "ablation")
    conditions = {(r["variant"], r["condition"]): r for r in results["summary"]["conditions"]}
    assert conditions[("centred", "ms_all")]["n_modes_removed"] > 0
    assert conditions[("centred", "ms_all")]["n"] == results["summary"]["n_samples"] > 10

    mcollapse(["experiment=msswap", *VISION, "experiment.group_by=object_category", "experiment.n_draws=2", *choice],
              tmp_path, env)
    _, results = _summary(tmp_path, "msswap")
    swap = results["summary"]
    assert swap["n_groups"] >= 2 and swap["kl_MS"] >= 0 and swap["shift_MS"] > 0


def test_lora_on_the_prismatic_twin(tmp_path, env):
    mcollapse(["experiment=lora", f"model={MODEL}", "dataset=synthetic_vision", "dataset.max_samples=120",
               "experiment.label=super_category", "experiment.group_by=null", "lora.epochs=1", "lora.batch_size=8",
               "experiment.max_new_tokens=6"], tmp_path, env)
    run, results = _summary(tmp_path, "lora")
    s = results["summary"]
    assert s["training"]["epochs_run"] == 1 and s["task"]["lora"]["n"] == s["split"]["test"]["n"] >= 20
    assert s["upstream_max_abs_difference"] == {"encoder_output": 0.0, "adapter_output": 0.0}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
