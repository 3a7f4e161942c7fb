"""The CLI end to end on tiny models: output contract, sweeps, failures, resume, user errors.

What is about the CLI itself (its files, logs, exit statuses, one-line errors, sweeps, a killed process)
runs `mcollapse` in a process of its own; the experiments' results run in-process (run_experiment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import cremad_copy_with_a_corrupt_clip, mcollapse, only_run_dir, run_experiment

SMALL_SPEECH = [
    "dataset.generate_options.n_speakers=4", "dataset.generate_options.n_per_class=8",
    "dataset.max_samples=96",
]


def test_single_run_writes_the_output_contract(tmp_path, env):
    mcollapse(["model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "synthetic_speech")
    for name in ("results.json", "results.csv", "meta.json", "probe_accuracy.png", ".hydra/config.yaml"):
        assert (run / name).exists(), name
    assert list(run.glob("*.log"))
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["hooks"] == ["encoder_output", "adapter_output", "llm_layer_16", "llm_final"]
    modal = results["summary"]["probes"]["modal"]
    assert {"speaker", "emotion", "lexical"} <= set(modal)
    assert set(modal["speaker"]) == set(results["summary"]["hooks"])
    row = results["rows"][0]
    assert list(row)[:8] == ["experiment", "model", "dataset", "hook", "info_type", "seed", "metric", "value"]
    assert {r["seed"] for r in results["rows"]} == {42, 43, 44, 45, 46}
    assert "text" in results["summary"]["probes"]
    header = (run / "results.csv").read_text().splitlines()[0]
    assert header.startswith("experiment,model,dataset,hook,info_type,seed,metric,value")
    meta = json.loads((run / "meta.json").read_text())
    assert {"git_sha", "packages", "device", "stage_seconds", "counts"} <= set(meta)
    assert meta["counts"]["n_selected"] == 96 and meta["stage_seconds"]["extract_modal"] > 0
    assert meta["config"]["threads"] == "auto" and meta["threads"] == 1  # auto gives a twin one thread


def test_sweep_isolates_a_failing_job_and_exits_nonzero(tmp_path, env):
    proc = mcollapse(["-m", "model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH,
                      "seed=42,43", "hook.llm_layer=16,99", "experiment.text.source=none"],
                     tmp_path, env, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "2 sweep job(s) failed" in proc.stderr
    sweep = next((tmp_path / "multirun").glob("*/*"))
    base = sweep / "probe" / "tiny_qwen2audio" / "synthetic_speech"
    for seed in (42, 43):
        jobs = {p.name: p for p in (base / f"seed={seed}").iterdir()}  # other overrides name the subdir
        assert len(jobs) == 2, jobs
        good = next(p for n, p in jobs.items() if "hook.llm_layer=16" in n)
        bad = next(p for n, p in jobs.items() if "hook.llm_layer=99" in n)
        assert (good / "results.json").is_file() and not (good / "failed.json").exists()
        assert "out of range" in json.loads((bad / "failed.json").read_text())["error"]


def test_tiny_llava_on_synthetic_vision(tmp_path, env):
    run_experiment(["model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=120"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_llava" / "synthetic_vision")
    modal = json.loads((run / "results.json").read_text())["summary"]["probes"]["modal"]
    assert {"object_category", "super_category", "object_count"} <= set(modal)


def test_tiny_ultravox_on_synthetic_speech(tmp_path, env):
    run_experiment(["model=tiny_ultravox", "dataset=synthetic_speech", *SMALL_SPEECH], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_ultravox" / "synthetic_speech")
    results = json.loads((run / "results.json").read_text())
    probes = results["summary"]["probes"]
    assert set(probes["modal"]["speaker"]) == {"encoder_output", "adapter_output", "llm_layer_16", "llm_final"}
    assert "llm_final" in probes["text"]["lexical"] and results["counts"]["modal_skipped"] == {}


def test_text_baseline_from_another_model(tmp_path, env):
    run_experiment(["model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH,
                    "experiment.text.source=tiny_llama", "hook.roles=[adapter_output,llm_final]"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "synthetic_speech")
    summary = json.loads((run / "results.json").read_text())["summary"]
    assert set(summary["probes"]["text"]["lexical"]) == {"llm_final"}


def test_missing_data_dir_is_one_clear_line(tmp_path, env):
    proc = mcollapse(["dataset=librispeech", f"paths.data_root={tmp_path / 'nowhere'}", "model=tiny_qwen2audio"],
                     tmp_path, env, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mcollapse: error:") and "nowhere" in line and ".flac" in line


def test_unknown_model_lists_the_choices(tmp_path, env):
    proc = mcollapse(["model=no_such_model"], tmp_path, env, check=False)
    assert proc.returncode != 0 and "smol_speech" in proc.stderr


def test_cfg_job_prints_the_config(tmp_path, env):
    proc = mcollapse(["--cfg", "job", "model=llava", "dataset=coco", "probe.C=0.5", "hook.llm_layer=8"], tmp_path, env)
    assert "llava-hf/llava-1.5-7b-hf" in proc.stdout and "llm_layer: 8" in proc.stdout and "C: 0.5" in proc.stdout


def _arrays(cache: Path) -> dict:
    out = {}
    for path in sorted((cache / "activations").glob("*/activations.h5")):
        with h5py.File(path) as f:
            out[path.parent.name] = {k: f["vectors"][k][()] for k in f["vectors"]} | {"ids": f["ids"][()]}
    return out


def test_extraction_resumes_after_kill_9_with_identical_arrays(tmp_path, env, cache_dir):
    args = ["experiment=extract", "model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH,
            "model.batch_size=4", "flush_every=4", "experiment.text.source=none"]
    from mcollapse.models.twins import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    killed_env = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "killed")}
    # tiny checkpoints are reused from the shared cache so only activations differ
    (tmp_path / "killed").mkdir()
    os.symlink(cache_dir / "models", tmp_path / "killed" / "models")
    proc = subprocess.Popen([sys.executable, "-m", "mcollapse", *args], cwd=tmp_path, env=killed_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "killed").glob("activations/*/shards/shard-*.h5")):
        time.sleep(0.05)
    shards_before = list((tmp_path / "killed").glob("activations/*/shards/shard-*.h5"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert shards_before, "extraction never flushed a shard"
    assert not list((tmp_path / "killed").glob("activations/*/activations.h5")), "killed too late"
    mcollapse(args, tmp_path, killed_env)
    clean_env = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "clean")}
    (tmp_path / "clean").mkdir()
    os.symlink(cache_dir / "models", tmp_path / "clean" / "models")
    mcollapse(args, tmp_path, clean_env)
    resumed, clean = _arrays(tmp_path / "killed"), _arrays(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and resumed
    for key in clean:
        assert len(set(resumed[key]["ids"])) == len(resumed[key]["ids"]) == 96
        for name, array in clean[key].items():
            np.testing.assert_array_equal(resumed[key][name], array)


@pytest.mark.slow
def test_default_run_on_real_small_weights(tmp_path, env, shared_cache):
    """`mcollapse` with no arguments: smol_speech x synthetic_speech, offline, within minutes."""
    from mcollapse.models.provision import ensure_smol_speech

    ensure_smol_speech(shared_cache)  # provisioned once per machine, as a user's first run does
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("models", "downloads"):
        os.symlink(shared_cache / shared, cache / shared)
    started = time.perf_counter()
    mcollapse([], tmp_path, {**env, "MCOLLAPSE_CACHE": str(cache)}, timeout=900)
    wall = time.perf_counter() - started
    run = only_run_dir(tmp_path / "outputs" / "probe" / "smol_speech" / "synthetic_speech")
    results = json.loads((run / "results.json").read_text())
    modal = results["summary"]["probes"]["modal"]
    assert {"lexical", "speaker", "emotion", "acoustic"} <= set(modal)
    assert results["counts"]["n_selected"] == 200
    # real weights carry speaker identity well above chance at the encoder
    assert modal["speaker"]["encoder_output"]["accuracy_mean"] > 3 * modal["speaker"]["encoder_output"]["chance"]
    assert (run / "probe_accuracy.png").stat().st_size > 10_000
    print(f"default run wall time: {wall:.0f} s")


def test_corrupt_audio_is_skipped_and_listed_or_fatal_when_strict(tmp_path, env):
    target, clips = cremad_copy_with_a_corrupt_clip(tmp_path, env, 40, SMALL_SPEECH)
    (target / "notes.wav").write_bytes(b"")  # malformed name: skipped at indexing
    args = ["model=tiny_qwen2audio", "dataset=cremad", f"paths.data_root={tmp_path / 'data'}",
            "experiment.text.source=none", "hook.roles=[adapter_output]"]
    run_experiment(args, tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "cremad")
    counts = json.loads((run / "results.json").read_text())["counts"]
    assert counts["n_selected"] == 40 and counts["n_modal"] == 39
    assert list(counts["modal_skipped"]) == [clips[3].stem]
    assert sum(counts["files_skipped_at_load"].values()) == 1
    proc = mcollapse([*args, "strict=true"], tmp_path / "data", env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert clips[3].stem in proc.stderr.strip().splitlines()[-1]


def test_wasserstein_between_modal_and_text_of_the_same_llm(tmp_path, env):
    run_experiment(["experiment=wasserstein", "model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH,
                    "experiment.n_bootstrap=10"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "wasserstein" / "tiny_qwen2audio" / "synthetic_speech")
    summary = json.loads((run / "results.json").read_text())["summary"]
    assert summary["hook"] == "llm_layer_16" and summary["n_a"] == 96
    assert summary["w1_ci_low"] <= summary["w1"] <= summary["w1_ci_high"]
    assert summary["null_w1"] is not None and (run / "w1_clouds.png").is_file()
    refused = run_experiment(["experiment=wasserstein", "model=tiny_qwen2audio", "experiment.text.source=tiny_llama"],
                             tmp_path, env, check=False)
    assert refused.exit_code == 2 and "must be self" in refused.error


@pytest.mark.parametrize(("override", "message"), [
    ("seed=1.5", "seed"), ("seed=foo", "seed"), ("probe.C=-1", "probe.C must be > 0, got -1"),
    ("device=cuda", "device=cuda but this torch sees no CUDA GPU"),
])
def test_config_errors_exit_2_before_any_work(tmp_path, env, override, message):
    from mcollapse.errors import EXIT_USER_ERROR

    no_gpu = {**env, "CUDA_VISIBLE_DEVICES": ""}  # the device=cuda refusal holds on a GPU machine too
    proc = mcollapse(["model=tiny_qwen2audio", override], tmp_path, no_gpu, check=False)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/*/*/results.json"))


def _silent_cremad(root: Path) -> None:
    import soundfile

    folder = root / "CREMA-D" / "AudioWAV"
    folder.mkdir(parents=True)
    for actor in (1001, 1002):
        for sentence in ("IEO", "TIE"):
            for emotion in ("ANG", "SAD"):
                soundfile.write(folder / f"{actor}_{sentence}_{emotion}_XX.wav", np.zeros(4000, np.float32), 16_000)


def test_every_clip_silent_is_counted_and_exits_nothing_measured(tmp_path, env):
    from mcollapse.errors import EXIT_NOTHING_MEASURED, EXIT_USER_ERROR

    _silent_cremad(tmp_path / "data")
    args = ["model=tiny_qwen2audio", "dataset=cremad", f"paths.data_root={tmp_path / 'data'}",
            "hook.roles=[adapter_output,llm_final]", "dataset.info_types=[lexical]", "probe.min_samples=4"]
    outcome = run_experiment(args, tmp_path, env, check=False)
    assert outcome.exit_code == EXIT_NOTHING_MEASURED and "nothing" in outcome.error
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "cremad")
    results = json.loads((run / "results.json").read_text())
    assert results["counts"]["n_modal"] == 0
    reasons = list(results["counts"]["modal_skipped"].values())
    assert len(reasons) == 8 and all(r.endswith("audio is digital silence") for r in reasons)
    assert not results["summary"]["probes"].get("modal")  # the transcripts alone are no measurement
    strict = mcollapse([*args, "strict=true"], tmp_path / "data", env, check=False)
    assert strict.returncode == EXIT_USER_ERROR and "digital silence" in strict.stderr.strip().splitlines()[-1]


def test_a_run_whose_probes_were_all_skipped_exits_nothing_measured(tmp_path, env):
    """Each outcome has its own exit status: here nothing measured, then verify's failed checks."""
    from mcollapse.errors import EXIT_CHECKS_FAILED, EXIT_NOTHING_MEASURED

    proc = mcollapse(["model=tiny_qwen2audio", "dataset=synthetic_speech", *SMALL_SPEECH, "probe.min_samples=1000",
                      "experiment.text.source=none", "hook.roles=[adapter_output]"], tmp_path, env, check=False)
    assert proc.returncode == EXIT_NOTHING_MEASURED, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mcollapse: error:") and "min_samples" in last
    run = only_run_dir(tmp_path / "outputs" / "probe" / "tiny_qwen2audio" / "synthetic_speech")
    assert json.loads((run / "results.json").read_text())["summary"]["skipped"]
    verify = mcollapse(["experiment=verify", f"report.runs={run}"], tmp_path, env, check=False)
    assert verify.returncode == EXIT_CHECKS_FAILED and "none of the" in verify.stderr.strip().splitlines()[-1]
