"""experiment=shift on the twins: tiny_paligemma2 (the descendant) vs tiny_gemma2 (its base LLM)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from mcollapse.models.twins import ensure_tiny_checkpoint
from mcollapse.models.twins.shapes import TEXT_HIDDEN_SIZE, TEXT_NUM_LAYERS
from tests.helpers import only_run_dir, run_experiment

VISION = ["dataset=synthetic_vision", "dataset.generate_options.n_images=32", "dataset.generate_options.n_dev_images=2",
          "dataset.generate_options.n_train_images=2", "dataset.max_samples=24"]
N_HIDDEN = TEXT_NUM_LAYERS + 1


def _write_sae(path, d=TEXT_HIDDEN_SIZE, f=64, seed=0):
    rng = np.random.default_rng(seed)
    w_enc = rng.normal(size=(d, f)).astype(np.float32)
    np.savez(path, W_enc=w_enc, b_enc=np.zeros(f, np.float32), threshold=np.full(f, 0.5, np.float32),
             W_dec=(w_enc.T / f).astype(np.float32), b_dec=np.zeros(d, np.float32))
    return path


def _results(tmp_path, model):
    run = only_run_dir(tmp_path / "outputs" / "shift" / model / "synthetic_vision")
    return run, json.loads((run / "results.json").read_text())


def test_descendant_against_its_base_llm(tmp_path, env):
    sae = _write_sae(tmp_path / "params.npz")
    run_experiment(["experiment=shift", "model=tiny_paligemma2", "experiment.other_model=tiny_gemma2", *VISION,
                    f"experiment.sae.path={sae}", "experiment.sae.layer=5"], tmp_path, env)
    run, results = _results(tmp_path, "tiny_paligemma2")
    assert {"results.json", "results.csv", "meta.json", "shift.png"} <= {p.name for p in run.iterdir()}
    summary, per_layer = results["summary"], results["per_layer"]
    assert [row["layer"] for row in per_layer] == list(range(N_HIDDEN))
    assert summary["bos_excluded"] is True and summary["n_items"] == 24
    # the descendant's decoder is the base's plus 5 % noise: close, but measurably not the same
    for row in per_layer:
        assert 0.5 < row["cosine_of_means"] < 1.0 and row["mean_token_l2"] > 0
        assert 0.3 < row["cka_tokens"] < 1.0 - 1e-6 and 0 < row["relative_token_l2"] < 1.0
    assert summary["sae_block"] == 5 and summary["sae_hidden_states_index"] == 6
    assert "hidden_states index 6" in summary["sae_site"]
    assert 0 < summary["sae_mean_jaccard"] < 1 and summary["sae_fve_a"] < 1
    rows = {(r["hook"], r["metric"]) for r in results["rows"]}
    assert ("layer_0", "cka_items") in rows and ("layer_6", "sae_mean_jaccard") in rows
    meta = json.loads((run / "meta.json").read_text())
    assert meta["other_model"]["name"] == "tiny_gemma2"


def test_a_model_against_itself_is_exactly_unshifted(tmp_path, env):
    sae = _write_sae(tmp_path / "params.npz")
    run_experiment(["experiment=shift", "model=tiny_gemma2", *VISION, f"experiment.sae.path={sae}",
                    "experiment.sae.layer=17"], tmp_path, env)
    _, results = _results(tmp_path, "tiny_gemma2")
    for row in results["per_layer"]:
        assert row["cosine_of_means"] == pytest.approx(1.0) and row["mean_token_l2"] == 0.0
        assert row["cka_tokens"] == pytest.approx(1.0) and row["cka_items"] == pytest.approx(1.0)
    assert results["summary"]["sae_mean_jaccard"] == 1.0
    assert results["summary"]["sae_hidden_states_index"] == N_HIDDEN - 1


def test_lora_on_the_other_side_leaves_the_llm_input_alone(tmp_path, env, cache_dir):
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_checkpoint("tiny_gemma2", cache_dir))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    run_experiment(["experiment=shift", "model=tiny_gemma2", f"experiment.other_lora={tmp_path / 'adapter'}",
                    *VISION], tmp_path, env)
    _, results = _results(tmp_path, "tiny_gemma2")
    first, last = results["per_layer"][0], results["per_layer"][-1]
    assert first["mean_token_l2"] == 0.0 and first["cka_tokens"] == pytest.approx(1.0)
    assert last["mean_token_l2"] > 0 and last["cka_tokens"] < 1.0 - 1e-6
    assert results["summary"]["model_b"] == "tiny_gemma2+lora(adapter)"


def test_tokenizers_that_disagree_are_refused_in_one_line(tmp_path, env):
    outcome = run_experiment(["experiment=shift", "model=tiny_llava", "experiment.other_model=tiny_gemma2",
                              *VISION], tmp_path, env, check=False)
    assert outcome.exit_code != 0 and "identical token ids" in outcome.error and "\n" not in outcome.error
