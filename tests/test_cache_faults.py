"""Cache faults as a user meets them: changed media or texts, a truncated activations.h5, a
read-only cache, Ctrl-C, results.json without its fields, and `experiment=cache` over it all."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import numpy as np
import pytest

from mcollapse.data.base import Record
from mcollapse.extraction.extract import extract_modal, extract_text
from mcollapse.models import load_model
from mcollapse.models.twins import ensure_tiny_checkpoint
from mcollapse.report.runs import load_runs
from mcollapse.store.lock import ReadOnlyStore
from tests.helpers import mcollapse, model_cfg, only_run_dir, wav_records

DATASET = {"name": "clips", "fingerprint": "f" * 16}
SMALL = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
         "dataset.generate_options.n_per_class=8", "dataset.max_samples=48", "threads=1"]


class _Hook:
    name, roles, llm_layer, pooling = "default", ["adapter_output", "llm_final"], 16, "all"


@pytest.fixture(scope="module")
def family(cache_dir):
    return load_model(model_cfg("tiny_qwen2audio", batch_size=4), cache_dir, "cpu")


@pytest.fixture()
def records(tmp_path):
    return wav_records(tmp_path, [0.8, 1.2, 1.4, 1.0])


def test_edited_texts_recompute_the_text_activations(family, records, tmp_path):
    first = extract_text(family, records, DATASET, _Hook(), tmp_path / "cache")
    same = extract_text(family, records, DATASET, _Hook(), tmp_path / "cache")
    edited = [Record(r.id, r.path, r.modality, text=f"{r.text} and something else") for r in records]
    again = extract_text(family, edited, DATASET, _Hook(), tmp_path / "cache")
    assert first.computed == len(records) and same.computed == 0 and again.computed == len(records)
    assert not np.allclose(first.activations.vectors["llm_final"], again.activations.vectors["llm_final"])


def test_a_truncated_activations_file_is_moved_aside_named_and_recomputed(family, records, tmp_path, caplog):
    first = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    final = tmp_path / "cache" / "activations" / first.key / "activations.h5"
    final.write_bytes(final.read_bytes()[:300])
    caplog.set_level(logging.WARNING)
    again = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    assert again.computed == len(records) and str(final) in caplog.text
    assert len(list((tmp_path / "cache" / "quarantine").iterdir())) == 1
    for hook, vectors in first.activations.vectors.items():
        np.testing.assert_allclose(again.activations.vectors[hook], vectors, rtol=1e-5, atol=1e-6)


def test_a_read_only_cache_serves_complete_entries_and_says_what_it_cannot_write(family, records, tmp_path,
                                                                                   monkeypatch):
    first = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)  # no lock can be taken, nothing created
    monkeypatch.setattr(Path, "mkdir", refuse)
    served = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    assert served.computed == 0 and served.activations.ids == first.activations.ids
    with pytest.raises(ReadOnlyStore, match="not writable: cannot store activations entry") as error:
        extract_modal(family, records, DATASET, _Hook(), tmp_path / "empty")
    assert "\n" not in str(error.value)


def test_results_json_without_its_fields_is_listed_as_unreadable(tmp_path):
    good = tmp_path / "probe" / "a"
    good.mkdir(parents=True)
    (good / "results.json").write_text(json.dumps({"experiment": "probe", "model": "m", "dataset": "d"}))
    for name, payload in (("b", {"experiment": "probe"}), ("c", [1, 2]), ("d", {"experiment": "probe", "model": "m",
                                                                                 "dataset": "d", "summary": []})):
        (tmp_path / "probe" / name).mkdir()
        (tmp_path / "probe" / name / "results.json").write_text(json.dumps(payload))
    runs = load_runs([str(tmp_path)])
    assert [r.model for r in runs.runs] == ["m"]
    problems = dict(runs.unreadable)
    assert set(problems) == {"probe/b", "probe/c", "probe/d"}
    assert "lacks model, dataset" in problems["probe/b"] and "wrong type for summary" in problems["probe/d"]


def _overwrite_with_silence(data_root: Path) -> int:
    clips = sorted(data_root.rglob("*.wav"))
    for clip in clips:
        size = clip.stat().st_size
        clip.write_bytes(clip.read_bytes()[:44] + b"\0" * (size - 44))  # same header, same size
    return len(clips)


def _computed(root: Path) -> int:
    meta = max((root / "outputs" / "extract").rglob("meta.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(meta.read_text())["counts"]["modal_rows_computed"]


def test_cache_inspection_and_changed_media_as_a_user_meets_them(tmp_path, env, cache_dir):
    user = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "cache"), "MCOLLAPSE_DATA": str(tmp_path / "data")}
    ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    (tmp_path / "cache").mkdir()
    os.symlink(cache_dir / "models", tmp_path / "cache" / "models")  # tiny checkpoints, built once
    args = ["experiment=extract", *SMALL, "experiment.text.source=none"]
    mcollapse(args, tmp_path, user)

    listed = mcollapse(["experiment=cache"], tmp_path, user)
    assert "activations" in listed.stdout and "tiny_qwen2audio" in listed.stdout
    results = json.loads((only_run_dir(tmp_path / "outputs" / "cache") / "results.json").read_text())
    assert results["summary"]["by_kind"]["activations"] == 1 and results["summary"]["by_kind"]["datasets"] == 1
    mcollapse(["experiment=cache", "cache.action=verify"], tmp_path, user)

    final = next((tmp_path / "cache" / "activations").glob("*/activations.h5"))
    final.write_bytes(final.read_bytes()[:500])
    broken = mcollapse(["experiment=cache", "cache.action=verify"], tmp_path, user, check=False)
    assert broken.returncode == 3 and "unreadable activations.h5" in broken.stderr

    rerun = mcollapse(args, tmp_path, user)
    assert "Traceback" not in rerun.stderr and str(final) in rerun.stdout + rerun.stderr  # quarantined, named
    assert _computed(tmp_path) == 48

    assert _overwrite_with_silence(tmp_path / "data") > 0
    rerun = mcollapse(args, tmp_path, user, check=False)
    log = rerun.stdout + rerun.stderr
    assert "served from cache" not in log and "digital silence" in log  # the new content, not the old rows

    dry = mcollapse(["experiment=cache", "cache.action=prune", "cache.kind=activations"], tmp_path, user)
    assert "dry run: 2 entries" in dry.stdout and len(list((tmp_path / "cache" / "activations").iterdir())) == 2
    mcollapse(["experiment=cache", "cache.action=prune", "cache.kind=activations", "cache.dry_run=false"],
              tmp_path, user)
    assert not list((tmp_path / "cache" / "activations").iterdir())


def test_ctrl_c_ends_in_one_line_and_the_rerun_resumes(tmp_path, env, cache_dir):
    user = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "cache"), "MCOLLAPSE_DATA": str(tmp_path / "data")}
    ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    (tmp_path / "cache").mkdir()
    os.symlink(cache_dir / "models", tmp_path / "cache" / "models")
    # one sample a batch and a shard a batch: 48 fsynced shards keep the run busy for about a second
    # after the first one appears (2 cores), so the interrupt lands mid-extraction
    args = ["experiment=extract", *SMALL, "experiment.text.source=none", "model.batch_size=1", "flush_every=1"]
    # SIGINT back to its default in the child: a suite launched as a shell's background job (`… &`,
    # nohup from a script) starts with SIGINT ignored, and the child would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "mcollapse", *args], cwd=tmp_path, env=user,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "cache").glob("activations/*/shards/shard-*.h5")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("mcollapse: interrupted;")
    assert "re-running the same command resumes" in stderr
    rerun = mcollapse(args, tmp_path, user)
    assert "resuming" in rerun.stdout + rerun.stderr
