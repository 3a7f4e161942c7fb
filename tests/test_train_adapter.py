"""experiment=train_adapter: only the projector learns, held-out splits stay held out, checkpoints
load as model.projector, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file
from torch import nn

from mcollapse.analysis.transcripts import mean_token_f1, token_f1, word_error_rate
from mcollapse.data import synthetic_librispeech
from mcollapse.data.base import Record
from mcollapse.extraction.sequences import adapter_sequences
from mcollapse.models import load_model
from mcollapse.models.adapter_train import ProjectorTrainer, lr_factor, project, trainable_parameters
from tests.helpers import audio_samples, model_cfg, only_run_dir, run_experiment

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or not synthetic_librispeech.FORTUNES_DIR.is_dir(),
                                reason="espeak-ng or fortunes not installed")

SMALL_CORPUS = [
    "dataset=synthetic_librispeech",
    "dataset.generate_options.n_train_speakers=3", "dataset.generate_options.n_dev_speakers=2",
    "dataset.generate_options.n_test_speakers=2", "dataset.generate_options.n_train_sentences=8",
    "dataset.generate_options.n_dev_sentences=3", "dataset.generate_options.n_test_sentences=3",
]  # fmt: skip
FAST = ["model=tiny_qwen2audio", "experiment=train_adapter", "experiment.max_steps=6", "experiment.eval_every=2",
        "experiment.checkpoint_every=3", "experiment.batch_size=4", "experiment.warmup_steps=2",
        "experiment.lr=0.05", *SMALL_CORPUS]  # fmt: skip


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_only_the_projector_may_train():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    trainable = trainable_parameters(model, model[1])
    assert {id(p) for p in trainable} == {id(p) for p in model[1].parameters()}
    assert not any(p.requires_grad for p in model[0].parameters())


class Stack2(nn.Module):
    """A frame-stacking projector (as Ultravox's): two positions in, one out."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        t = x.shape[1] // 2 * 2
        return self.scale * x[:, :t].reshape(x.shape[0], t // 2, -1)


def test_a_length_changing_projector_runs_sample_by_sample_without_padding():
    xs = [np.ones((4, 2), np.float32), np.full((6, 2), 2.0, np.float32)]
    z, lengths = project(Stack2(), xs, torch.device("cpu"))
    assert lengths == [2, 3] and z.shape == (2, 3, 4)
    assert torch.all(z[0, 2:] == 0) and torch.all(z[1] == 2.0)


def test_word_error_rate_and_token_f1_on_planted_pairs():
    import jiwer

    refs, hyps = ["He didn't go home.", "The cat sat"], ["he didn't go", "the bat sat on"]
    assert word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(["he didn't go home", "the cat sat"],
                                                                  ["he didn't go", "the bat sat on"]))
    assert word_error_rate(refs, hyps) == pytest.approx(3 / 7)
    assert token_f1("a red circle", "A red circle!") == 1.0
    assert token_f1("two red circles", "red squares") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert mean_token_f1(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)


def test_a_split_sharing_speakers_with_training_is_refused(tmp_path, env):
    outcome = run_experiment([*FAST, "dataset.splits.dev=${dataset.splits.train}"], tmp_path, env, check=False)
    assert outcome.exit_code == 2 and "shares" in outcome.error and "dev split" in outcome.error


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("train")
    run_experiment(FAST, cwd, env)
    return only_run_dir(cwd / "outputs" / "train_adapter" / "tiny_qwen2audio" / "synthetic_librispeech")


def test_training_writes_projector_checkpoints_figure_and_organism_record(trained):
    organism = json.loads((trained / "organism.json").read_text())
    summary = json.loads((trained / "results.json").read_text())["summary"]
    assert summary["projector_module"] == "model.multi_modal_projector"
    assert summary["steps"] == 6 and summary["stop_reason"] == "max_steps"
    assert organism["checkpoints"] == [3, 6]
    for step in (3, 6):
        assert (trained / "checkpoints" / f"step-{step:06d}" / "projector.safetensors").is_file()
    assert (trained / "training.png").stat().st_size > 0
    assert [h["step"] for h in organism["history"]] == [0, 2, 4, 6]
    assert summary["best_dev_loss"] < summary["initial_dev_loss"]  # it learns on the training split
    assert organism["disjoint_from_train"]["eval"] == {"media": 0, "speakers": 0, "sentences": 0}
    for split in ("train", "dev", "eval"):
        assert len(organism["data"][split]["fingerprint"]) == 64
    assert math.isfinite(summary["heldout_wer"]) and summary["gmi_n_alternatives"] >= 1
    assert set(load_file(str(trained / "projector.safetensors"))) == {"linear.weight", "linear.bias"}


def test_a_trained_projector_loads_and_changes_the_adapter_output_only(trained, cache_dir, tmp_path):
    records = []
    for sample in audio_samples([1.2, 2.0]):
        path = tmp_path / f"{sample.id}.wav"
        soundfile.write(path, sample.audio, 16_000)
        records.append(Record(id=sample.id, path=path, modality="audio", text=sample.record.text))
    dataset = {"name": "clips", "fingerprint": "f" * 16}
    outputs = {}
    for name, overrides in (("base", {}), ("trained", {"projector": str(trained)})):
        family = load_model(model_cfg("tiny_qwen2audio", **overrides), cache_dir, "cpu")
        outputs[name] = {role: adapter_sequences(family, records, dataset, tmp_path / "cache", role=role).arrays
                         for role in ("encoder_output", "adapter_output")}
    for a, b in zip(outputs["base"]["encoder_output"], outputs["trained"]["encoder_output"]):
        assert np.array_equal(a, b)
    assert not any(np.allclose(a, b) for a, b in zip(outputs["base"]["adapter_output"],
                                                      outputs["trained"]["adapter_output"]))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, env, trained, monkeypatch):
    calls = {"n": 0}
    original = ProjectorTrainer._evaluate_and_save

    def dies_after_the_second_save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the state at step 2 is on disk
            raise KeyboardInterrupt

    cache = tmp_path / "cache"
    shutil.copytree(env["MCOLLAPSE_CACHE"], cache, ignore=shutil.ignore_patterns("projectors"), symlinks=True)
    own_env = {**env, "MCOLLAPSE_CACHE": str(cache)}
    monkeypatch.setattr(ProjectorTrainer, "_evaluate_and_save", dies_after_the_second_save)
    (tmp_path / "a").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(FAST, tmp_path / "a", own_env)
    monkeypatch.setattr(ProjectorTrainer, "_evaluate_and_save", original)
    (tmp_path / "b").mkdir()
    run_experiment(FAST, tmp_path / "b", own_env)
    resumed = only_run_dir(tmp_path / "b" / "outputs" / "train_adapter" / "tiny_qwen2audio" / "synthetic_librispeech")
    assert json.loads((resumed / "results.json").read_text())["summary"]["resumed_at_step"] == 2
    for name in ("projector.safetensors", "checkpoints/step-000006/projector.safetensors"):
        a, b = load_file(str(trained / name)), load_file(str(resumed / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_missing_projector_file_is_one_line(tmp_path, env):
    outcome = run_experiment(["experiment=extract", "model=tiny_qwen2audio", *SMALL_CORPUS,
                              f"model.projector={tmp_path / 'nowhere'}"], tmp_path, env, check=False)
    assert outcome.exit_code == 2 and "projector.safetensors" in outcome.error


def test_unknown_split_is_refused(tmp_path, env):
    outcome = run_experiment([*FAST, "experiment.dev_split=valid"], tmp_path, env, check=False)
    assert outcome.exit_code == 2 and "no split 'valid'" in outcome.error


def test_a_run_stopped_by_its_time_budget_goes_on_under_a_larger_one(tmp_path, env):
    cache = tmp_path / "cache"
    shutil.copytree(env["MCOLLAPSE_CACHE"], cache, ignore=shutil.ignore_patterns("projectors"), symlinks=True)
    own_env = {**env, "MCOLLAPSE_CACHE": str(cache)}
    outcomes = []
    for name, budget in (("a", "0.0001"), ("b", "null")):
        (tmp_path / name).mkdir()
        run_experiment([*FAST, f"experiment.max_minutes={budget}"], tmp_path / name, own_env)
        run = only_run_dir(tmp_path / name / "outputs" / "train_adapter" / "tiny_qwen2audio" / "synthetic_librispeech")
        outcomes.append(json.loads((run / "results.json").read_text())["summary"])
    assert outcomes[0]["stop_reason"] == "time_budget" and outcomes[0]["steps"] < 6
    assert outcomes[1]["stop_reason"] == "max_steps" and outcomes[1]["resumed_at_step"] == outcomes[0]["steps"]


def _generated_corpus(env) -> Path:
    """The small synthetic LibriSpeech set, generated if this session has not yet."""
    from hydra import compose, initialize_config_dir

    from mcollapse.cli import config_dir
    from mcollapse.data import load_records

    with mock.patch.dict(os.environ, env, clear=True), initialize_config_dir(config_dir=config_dir(),
                                                                              version_base="1.3"):
        load_records(compose(config_name="config", overrides=FAST).dataset)
    return Path(env["MCOLLAPSE_DATA"]) / "synthetic_librispeech"


def test_an_all_silent_training_split_is_one_line_naming_it(tmp_path, env):
    corpus = _generated_corpus(env)
    silent = tmp_path / "silent" / "train-clean-100"
    shutil.copytree(corpus / "train-clean-100", silent)
    for clip in silent.rglob("*.flac"):
        soundfile.write(clip, np.zeros(soundfile.info(clip).frames, np.float32), 16_000, format="FLAC")
    outcome = run_experiment([*FAST, "dataset.generate=null",
                              f"dataset.splits.train=[{{format:librispeech,root:'{silent}'}}]"], tmp_path, env,
                             check=False)
    assert outcome.exit_code == 2, outcome
    assert outcome.error.startswith("the train split (experiment.train_split: 'synthetic_librispeech@train') has "
                                    "no usable sample: 16 skipped, first ")
    assert outcome.error.endswith("audio is digital silence")


def test_a_missing_best_weights_file_is_named_not_blamed_on_model_projector(tmp_path, env, monkeypatch):
    from mcollapse.models.adapter_train import BEST_DIR

    fit = ProjectorTrainer.fit

    def fit_then_lose_the_best_weights(self, *args, **kwargs):
        outcome = fit(self, *args, **kwargs)
        (self.state_dir / BEST_DIR / "projector.safetensors").unlink()
        return outcome

    cache = tmp_path / "cache"
    shutil.copytree(env["MCOLLAPSE_CACHE"], cache, ignore=shutil.ignore_patterns("projectors"), symlinks=True)
    monkeypatch.setattr(ProjectorTrainer, "fit", fit_then_lose_the_best_weights)
    outcome = run_experiment(FAST, tmp_path, {**env, "MCOLLAPSE_CACHE": str(cache)}, check=False)
    assert outcome.exit_code == 2 and "model.projector" not in outcome.error
    assert outcome.error.startswith(f"the best projector weights {cache}/projectors/")
    assert "best/projector.safetensors are missing from the training state" in outcome.error
