"""The decoder-side experiments end to end on the tiny twins: lipschitz, modes, gradproj, gmi (run in-process;
the CLI's own behaviour is test_cli's)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from mcollapse.analysis.modes import load_basis
from tests.helpers import only_run_dir, run_experiment

SPEECH = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
          "dataset.generate_options.n_per_class=8", "dataset.max_samples=48"]


def _summary(root, experiment, model, dataset):
    run = only_run_dir(root / "outputs" / experiment / model / dataset)
    return run, json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("args,model,dataset,group", [
    (SPEECH, "tiny_qwen2audio", "synthetic_speech", "speaker"),
])  # the other twins run these experiments in the paper grid (test_cli_paper)
def test_decoder_experiments_share_sequences_modes_and_gradients(tmp_path, env, args, model, dataset, group):
    run_experiment(["experiment=lipschitz", *args], tmp_path, env)
    run, results = _summary(tmp_path, "lipschitz", model, dataset)
    s = results["summary"]
    assert s["target"] == "content" and s["reduction"] == "sum" and s["n_samples"] > 10
    assert 0 < s["L_median"] <= s["L_p95"] <= s["L_max"] and s["L_mean_x_D"] == pytest.approx(s["L_mean"] * s["D"])
    assert s["D_eff"] > 0 and s["participation_ratio"] >= 1 and s["D_S"] >= s["D"] - 1e-9
    for name in ("lipschitz_hist.png", "per_sample.csv", "results.csv", "meta.json"):
        assert (run / name).is_file(), name
    assert len((run / "per_sample.csv").read_text().splitlines()) == s["n_samples"] + 1
    assert s["D_reference"] > 0 and s["L_pooled_mean"] > 0 and s["L_space"] == "adapter_output"
    assert s["n_secant"] + s["n_secant_without_neighbour"] == min(100, s["n_samples"]) and s["n_secant"] > 0
    assert 0 < s["L_secant_median"] <= s["L_secant_max"] and len(s["selection_digest"]) == 16

    run_experiment(["experiment=modes", *args], tmp_path, env)
    run, results = _summary(tmp_path, "modes", model, dataset)
    s = results["summary"]
    assert s["n_ms"] + s["n_ta"] == s["n_modes"] and 0 <= s["ms_variance_share"] <= 1
    assert results["counts"]["sequence_rows_computed"] == 0  # the encoder ran once, for lipschitz
    basis, alignment, meta = load_basis(run / "eigenbasis.npz")
    assert basis.n_modes == s["n_modes"] and alignment.n_ms == s["n_ms"] and meta["space"] == "adapter_output"
    assert (run / "mode_alignment.png").is_file() and (run / "modes.csv").is_file()
    assert set(s["n_ms_by_threshold"]) >= {"0.1", "0.5", "0.9"}
    assert s["rho_normalization"] == "none" and s["empty_classes"] == [] and s["trace_ratio"] > 0
    assert s["rho_normalised_0"] == pytest.approx(s["rho_0"] * s["trace_ratio"])

    # the random-weight LLaVA twin has no mode below rho 0.5, so it gets its own threshold
    choice = [f"experiment.basis={run / 'eigenbasis.npz'}"] if s["n_ms"] else ["modes.ms_threshold=50"]
    run_experiment(["experiment=ablation", *args, "experiment.n_random=3", "experiment.ms_k=[1]", *choice,
                    "experiment.n_matched=3", "experiment.n_dose=6", "experiment.optimal_steps=3"], tmp_path, env)
    abl_run, results = _summary(tmp_path, "ablation", model, dataset)
    summary = results["summary"]
    conditions = {(r["variant"], r["condition"]): r for r in summary["conditions"]}
    assert {c for _, c in conditions} >= {"swap", "floor", "ms_all", "ta_top", "random_k", "ms_top1",
                                          "random_matched:ms_all"}
    assert {v for v, _ in conditions} == {"swap", "floor", "resample", "position_mean", "optimal", "centred",
                                          "uncentred"}
    ms = conditions[("resample", "ms_all")]
    assert ms["n_modes_removed"] == summary["n_ms"] > 0 and ms["n"] == summary["n_samples"]
    assert summary["n_ms"] == s["n_ms"] or not s["n_ms"]
    assert conditions[("centred", "random_k")]["n_subspaces"] == 3 and 0 <= ms["p"] <= 1
    assert ms["delta_cluster_ci_low"] <= ms["delta_loss"] <= ms["delta_cluster_ci_high"]
    assert ms["frac_of_swap"] == pytest.approx(ms["delta_loss"] / summary["delta_swap"])
    assert summary["delta_swap_ci_low"] <= summary["delta_swap"] <= summary["delta_swap_ci_high"]
    assert summary["frac_of_swap_readable"] == (summary["delta_swap_ci_low"] > 0)
    assert 0 <= ms["variance_share_removed_token"] <= 1 and 0 <= ms["variance_share_removed"] <= 1
    assert conditions[("optimal", "ms_all")]["n"] == summary["optimal"]["n_scored"] < summary["n_samples"]
    assert summary["clusters"]["speaker_id"] >= 2 and summary["clusters"]["sentence"] >= 2
    assert "class_effect" in conditions[("resample", "ms_all")] and summary["dose_curves"]["resample"]["n_points"] == 6
    header = (abl_run / "per_sample.csv").read_text().splitlines()[0]
    assert header.startswith("sample_id,loss_baseline,loss_swap/draw0")
    for name in ("ablation.png", "dose_response.png", "dose_response.csv"):
        assert (abl_run / name).is_file()
    assert "optimal_fit" in json.loads((abl_run / "meta.json").read_text())["stage_seconds"]
    shutil.move(str(abl_run), str(tmp_path / "first_ablation"))  # the re-run reads the store, fits nothing
    run_experiment(["experiment=ablation", *args, "experiment.n_random=3", "experiment.ms_k=[1]", *choice,
                    "experiment.n_matched=3", "experiment.n_dose=6", "experiment.optimal_steps=3"], tmp_path, env)
    rerun, again = _summary(tmp_path, "ablation", model, dataset)
    assert "optimal_fit" not in json.loads((rerun / "meta.json").read_text())["stage_seconds"]
    assert again["counts"]["ablation_batches_from_cache"] == again["counts"]["ablation_batches"]
    assert again["summary"]["conditions"] == summary["conditions"]

    run_experiment(["experiment=msswap", *args, f"experiment.group_by={group}", "experiment.n_draws=2", *choice],
                   tmp_path, env)
    swap_run, results = _summary(tmp_path, "msswap", model, dataset)
    swap = results["summary"]
    assert swap["group_by"] == group and swap["n_groups"] >= 2 and swap["n_samples"] > 10
    assert swap["kl_MS"] >= 0 and swap["kl_TA"] >= 0 and swap["shift_MS"] > 0 and swap["shift_TA"] > 0
    assert 0 <= swap["kl_MS_vs_TA_p"] <= 1 and (swap_run / "msswap.png").is_file()
    assert swap["kl_ALL"] >= 0 and swap["frac_of_all_MS"] == pytest.approx(swap["delta_ce_MS"] / swap["delta_ce_ALL"])
    assert swap["delta_ce_ALL_cluster_ci_low"] <= swap["delta_ce_ALL"] <= swap["delta_ce_ALL_cluster_ci_high"]
    assert len((swap_run / "per_sample.csv").read_text().splitlines()) == 2 * swap["n_samples"] + 1

    run_experiment(["experiment=gradproj", *args], tmp_path, env)
    run, results = _summary(tmp_path, "gradproj", model, dataset)
    counts = results["counts"]  # the lipschitz run's gradient pass, projections included, is reused
    assert counts["gradients_batches_from_cache"] == counts["gradients_batches"] > 0
    s = results["summary"]
    assert s["n_samples"] > 10 and -1 <= s["spearman_r"] <= 1 and 0 <= s["spearman_p"] <= 1
    assert (run / "gradproj.png").is_file()

    run_experiment(["experiment=gmi", *args, "experiment.n_alternatives=5", "experiment.n_boot=200"], tmp_path, env)
    run, results = _summary(tmp_path, "gmi", model, dataset)
    s = results["summary"]
    for kind in ("modal", "text"):
        assert s[f"gmi_{kind}_ci_low"] <= s[f"gmi_{kind}"] <= s[f"gmi_{kind}_ci_high"]
        assert s[f"gmi_{kind}"] <= math.log(6) + 1e-9
    assert s["W1_conditional_pooled"] > 0 and s["theorem2_log_rhs_D"] >= s["theorem2_log_rhs_D_eff"] - 1e-9
    assert not any(k.startswith("theorem2_holds") for k in s)  # no pass/fail the measurement cannot back
    assert s["L_log_pooled"] > 0 and math.isfinite(s["theorem2_log_rhs_pooled_D_eff"]) and "log_abs_gap" in s
    assert "accessibility_gap_modal" in s and "accessibility_gap_skipped" not in s  # probe_label=transcript
    assert results["counts"]["gradients_batches_from_cache"] == results["counts"]["gradients_batches"]  # lipschitz's
    assert results["counts"]["scores_modal_batches"] > 0 == results["counts"]["scores_modal_batches_from_cache"]
    scores = np.load(run / "gmi_scores.npz")
    assert scores["modal"].shape == (s["n_samples"], 6)
    assert (scores["candidates"][:, 0] == np.arange(s["n_samples"])).all()
    assert (run / "gmi.png").is_file()

    run_experiment(["experiment=wasserstein", *args, "experiment.n_bootstrap=5"], tmp_path, env)
    _, results = _summary(tmp_path, "wasserstein", model, dataset)
    assert results["summary"]["lipschitz_target"] == "content" and results["summary"]["L_p95_x_W1"] > 0


def test_wasserstein_reports_l_times_w1_after_a_lipschitz_run(tmp_path, env):
    run_experiment(["experiment=lipschitz", *SPEECH, "target=reference"], tmp_path, env)
    _, lip = _summary(tmp_path, "lipschitz", "tiny_qwen2audio", "synthetic_speech")
    assert lip["summary"]["target"] == "reference" and lip["summary"]["reduction"] == "mean"
    assert lip["summary"]["n_samples"] == 48  # reference scores the prompt: samples without text count too
    run_experiment(["experiment=wasserstein", *SPEECH, "target=reference", "experiment.n_bootstrap=5"], tmp_path, env)
    _, w1 = _summary(tmp_path, "wasserstein", "tiny_qwen2audio", "synthetic_speech")
    s = w1["summary"]
    assert s["L_mean_x_W1"] == pytest.approx(lip["summary"]["L_mean"] * s["w1"])
    assert s["lipschitz_target"] == "reference"


def test_user_errors_are_one_line(tmp_path, env):
    """Each refusal is a UserError, which the CLI prints as one line (test_cli checks that line)."""
    outcome = run_experiment(["experiment=gmi", *SPEECH, "target=reference"], tmp_path, env, check=False)
    assert outcome.exit_code == 2 and "target=content" in outcome.error
    outcome = run_experiment(["experiment=gmi", *SPEECH, "target.reduction=mean"], tmp_path, env, check=False)
    assert outcome.exit_code == 2 and "target.reduction=sum" in outcome.error
    outcome = run_experiment(["experiment=lipschitz", "model=tiny_llama", "dataset=synthetic_speech"], tmp_path, env,
                             check=False)
    assert outcome.exit_code == 2 and "text-only" in outcome.error


def test_clips_cut_to_the_window_are_counted_and_not_scored_for_content(tmp_path, env):
    window = ["model.audio_window_s=1.9"]  # about half the synthetic sentences are longer
    for name in ("skip", "keep"):
        (tmp_path / name).mkdir()
    run_experiment(["experiment=lipschitz", *SPEECH, *window], tmp_path / "skip", env)
    run, results = _summary(tmp_path / "skip", "lipschitz", "tiny_qwen2audio", "synthetic_speech")
    counts, s = results["counts"], results["summary"]
    assert 0 < counts["n_cut_clips_skipped"] <= counts["n_audio_cut_to_window"]
    assert s["n_samples"] == counts["n_with_text"] - counts["n_cut_clips_skipped"]
    assert (run / "scored_ids.txt").read_text().split() == [
        line.split(",")[0] for line in (run / "per_sample.csv").read_text().splitlines()[1:]]
    assert 1 <= s["n_speakers"] <= 4 and len(s["scored_ids_digest"]) == 16
    run_experiment(["experiment=lipschitz", *SPEECH, *window, "target.keep_cut_clips=true"], tmp_path / "keep", env)
    _, kept = _summary(tmp_path / "keep", "lipschitz", "tiny_qwen2audio", "synthetic_speech")
    assert kept["counts"]["n_cut_clips_skipped"] == 0 and kept["summary"]["n_samples"] == counts["n_with_text"]
