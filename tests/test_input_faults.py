"""Faults a user can cause end in one line naming the setting or file, never in a traceback or a
silently wrong number: copied media, broken projector and SAE files, undecodable transcripts,
broken run results and expected-value files, unknown model names, too few samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from mcollapse.data import load_records
from mcollapse.data.librispeech import load_part
from mcollapse.errors import DataError, UserError
from mcollapse.experiments.report import build, runs_from
from mcollapse.experiments.shift import _sae_site
from mcollapse.models.projector import load_projector
from mcollapse.report.expectations import load_expectations
from mcollapse.report.runs import load_runs
from mcollapse.store import ContentDigests
from tests.helpers import only_run_dir, run_experiment

# --------------------------------------------------------------------------------------------
# Media digests: a copy, a swap or a restored mtime cannot pass for the clip that was hashed


def _tone(path: Path, hz: float, seconds: float = 1.0) -> None:
    t = np.arange(int(16_000 * seconds)) / 16_000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16_000, subtype="PCM_16")


def _cremad_clips(root: Path, n: int) -> list[Path]:
    """n CREMA-D clips of one second each (every file the same size), all with the same mtime."""
    audio = root / "CREMA-D" / "AudioWAV"
    audio.mkdir(parents=True)
    sentences = ["DFA", "IEO", "IOM", "ITH"]
    clips = []
    for i in range(n):
        path = audio / f"{1001 + i % 4}_{sentences[i // 4 % 4]}_{['ANG', 'HAP'][i % 2]}_XX.wav"
        _tone(path, 200 + 40 * i)
        clips.append(path)
    for clip in clips:
        os.utime(clip, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return clips


def _swap(a: Path, b: Path) -> None:
    """`mv a tmp; mv b a; mv tmp b`: the names trade contents, sizes and mtimes stay as they were."""
    tmp = a.with_name("swap.tmp")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _fingerprint(root: Path, memo: Path) -> str:
    dataset = OmegaConf.create({"name": "clips", "parts": [{"format": "cremad", "root": str(root / "CREMA-D")}]})
    return load_records(dataset, ContentDigests(memo))[1]["fingerprint"]


def test_swapping_two_same_size_clips_with_equal_mtimes_changes_the_fingerprint(tmp_path):
    clips = _cremad_clips(tmp_path / "data", 2)
    memo = tmp_path / "memo.json"
    before = _fingerprint(tmp_path / "data", memo)
    _swap(*clips)
    assert clips[0].stat().st_size == clips[1].stat().st_size
    assert clips[0].stat().st_mtime_ns == clips[1].stat().st_mtime_ns
    after = _fingerprint(tmp_path / "data", memo)
    assert after != before
    assert after == _fingerprint(tmp_path / "data", tmp_path / "fresh.json")  # what hashing every file gives


def test_a_same_size_edit_that_restores_the_mtime_is_hashed_again(tmp_path):
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"\x01" * 64)
    memo = tmp_path / "memo.json"
    digests = ContentDigests(memo)
    first = digests(clip)
    digests.save()
    stat = clip.stat()
    clip.write_bytes(b"\x02" * 64)  # as `cp -p` or `rsync -a` leave it: new bytes, the old size and mtime
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ContentDigests(memo)(clip) != first


@pytest.mark.slow
def test_a_rerun_after_a_swap_recomputes_instead_of_serving_the_old_activations(tmp_path, env):
    clips = _cremad_clips(tmp_path / "data", 8)
    args = ["experiment=extract", "model=tiny_qwen2audio", "dataset=cremad", f"paths.data_root={tmp_path / 'data'}",
            "experiment.text.source=none", "hook.roles=[adapter_output]", "dataset.max_samples=null"]
    results = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        if name == "second":
            _swap(clips[0], clips[5])
        run_experiment(args, tmp_path / name, env)
        run = only_run_dir(tmp_path / name / "outputs" / "extract" / "tiny_qwen2audio" / "cremad")
        results.append(json.loads((run / "results.json").read_text()))
    assert results[1]["summary"]["selection_digest"] != results[0]["summary"]["selection_digest"]
    assert results[1]["counts"]["modal_rows_computed"] > 0


# --------------------------------------------------------------------------------------------
# Projector files


def _projector_file(path: Path, weight: torch.Tensor | None = None) -> Path:
    state = {"weight": torch.randn(3, 4) if weight is None else weight, "bias": torch.zeros(3)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_projector_file_is_one_line_naming_it(tmp_path, damage):
    path = _projector_file(tmp_path / "projector.safetensors")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(200), "empty": b""}[damage])
    with pytest.raises(UserError, match="projector weights .*projector.safetensors are unreadable") as error:
        load_projector(nn.Linear(4, 3), str(path))
    assert "\n" not in str(error.value)


def test_a_truncated_training_checkpoint_is_one_line_naming_its_file(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    path = _projector_file(checkpoint / "projector.safetensors")
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match=f"{path} are unreadable"):
        load_projector(nn.Linear(4, 3), str(checkpoint))


def test_nan_projector_weights_blame_the_file_not_the_samples(tmp_path):
    weight = torch.randn(3, 4)
    weight[1, 2] = float("nan")
    path = _projector_file(tmp_path / "p.safetensors", weight)
    with pytest.raises(UserError, match=f"projector weights {path} hold NaN or infinite values \\(in weight\\)"):
        load_projector(nn.Linear(4, 3), str(path))


# --------------------------------------------------------------------------------------------
# Data


def test_a_transcript_byte_that_is_not_utf8_names_the_file_and_line(tmp_path):
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198-0001.flac").write_bytes(b"x")
    transcript = chapter / "19-198.trans.txt"
    transcript.write_bytes(b"19-198-0000 A LINE\n19-198-0001 CAF\xe9 AU LAIT\n")
    with pytest.raises(DataError, match=f"{transcript} line 2: not valid UTF-8 \\(byte 0xe9 at column 16\\)"):
        load_part(tmp_path)


# --------------------------------------------------------------------------------------------
# report / verify inputs


def _results(run_dir: Path, payload) -> Path:
    run_dir.mkdir(parents=True)
    path = run_dir / "results.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _report_cfg(runs: Path):
    return OmegaConf.create({"report": {"runs": str(runs)}})


@pytest.mark.parametrize("payload,why", [("{not json", "JSONDecodeError"),
                                         ({"experiment": "probe"}, "lacks model, dataset")])
def test_a_dir_whose_only_results_are_broken_names_the_file(tmp_path, payload, why):
    path = _results(tmp_path / "probe" / "a", payload)
    with pytest.raises(UserError, match=f"no readable run under .*: {path} is broken \\(.*{why}"):
        runs_from(_report_cfg(tmp_path))


def _probe_row(without: str = "", **changes) -> dict:
    row = {"experiment": "probe", "model": "m", "dataset": "d", "hook": "encoder_output", "info_type": "speaker",
           "seed": 42, "metric": "accuracy", "value": 0.5, "input": "modal", "pooling": "all", "probe": "default",
           "chance": 0.25, **changes}
    row.pop(without, None)
    return row


def test_rows_that_no_table_can_read_are_counted_and_reported(tmp_path):
    rows = [_probe_row(), _probe_row(seed=43, value=0.7), _probe_row(seed=44, value="0.9 (see log)"),
            _probe_row("info_type", seed=45), _probe_row("value", seed=46)]
    _results(tmp_path / "runs" / "probe" / "a", {"experiment": "probe", "model": "m", "dataset": "d", "rows": rows})
    runs = load_runs(str(tmp_path / "runs"))
    assert [n for _, n, _ in runs.dropped_rows] == [3]
    assert len(runs.runs[0].rows) == 2
    summary = build(runs, tmp_path / "report")
    assert summary["tables"]["table5_probes"]["rows"] == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "3 rows dropped" in report and "value '0.9 (see log)' is not a number" in report
    assert "1 with no info_type" in report and "1 with no value" in report


@pytest.mark.parametrize("content,message", [
    ({"checks": 5}, "checks: must be a list"),
    ({"checks": [{"name": "x", "table": "t", "column": "c", "expected": "high", "tol": 1}]},
     "checks\\[0\\]: 'expected' must be a number, got 'high'"),
    ({"checks": [{"name": "x", "table": "t", "column": "c", "min": 0, "where": ["model", "m"]}]},
     "checks\\[0\\] where: must be a mapping"),
    ({"grids": [{"table": "t", "columns": ["a"], "rows": [{"expected": 0.5}]}]},
     "grids\\[0\\] rows\\[0\\] expected: must be a list"),
    ({"grids": [{"columns": ["a"], "rows": [{"expected": [0.5]}]}]}, "grids\\[0\\]: a grid needs 'table'"),
    ({"grids": ["table5_probes"]}, "grids\\[0\\]: must be a mapping"),
])
def test_a_malformed_expected_values_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "expected.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(UserError, match=message):
        load_expectations(path)


# --------------------------------------------------------------------------------------------
# Lenses


def test_a_random_bytes_sae_file_is_named_without_a_hint_to_unpickle(tmp_path):
    path = tmp_path / "params.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    exp = OmegaConf.create({"sae": {"path": str(tmp_path), "layer": 0}})
    with pytest.raises(UserError, match=f"experiment.sae.path {path} is not an .npz archive") as error:
        _sae_site(exp, 4)
    assert "pickle" not in str(error.value)


def test_an_unknown_other_or_compare_model_names_its_setting():
    from mcollapse.pipeline.layer_inputs import comparison_model
    from mcollapse.pipeline.other_model import other_model_config

    with pytest.raises(UserError, match="^experiment.other_model 'nosuch' is not a model config"):
        other_model_config("nosuch", None)
    cfg = OmegaConf.create({"model": {"name": "m"}})
    with pytest.raises(UserError, match="^experiment.compare entry's model 'nosuch' is not a model config"):
        comparison_model(cfg, {"name": "x", "model": "nosuch"})


SMALL = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
         "dataset.generate_options.n_per_class=8"]


@pytest.mark.slow
def test_similarity_over_one_sample_is_refused(tmp_path, env):
    outcome = run_experiment(["experiment=similarity", *SMALL, "dataset.max_samples=1"], tmp_path, env, check=False)
    assert outcome.exit_code == 2
    assert outcome.error == "similarity needs at least 2 samples, 1 selected: raise dataset.max_samples"


@pytest.mark.slow
def test_an_unknown_shift_model_is_refused_before_any_work_naming_its_setting(tmp_path, env):
    outcome = run_experiment(["experiment=shift", *SMALL, "experiment.other_model=nosuch"], tmp_path, env,
                             check=False)
    assert outcome.exit_code == 2 and outcome.error.startswith("experiment.other_model 'nosuch' is not a model")

