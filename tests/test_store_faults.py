"""Store faults as a user meets them: broken files of every kind are quarantined and computed again
(or named in one line), `experiment=cache` verifies every file and prunes only what no run holds, and
a full disk or an unwritable run dir ends in one line."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import filelock
import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mcollapse.errors import EXIT_CHECKS_FAILED, EXIT_USER_ERROR, UserError
from mcollapse.extraction.extract import extract_modal
from mcollapse.models import load_model
from mcollapse.models.adapter_train import ProjectorTrainer
from mcollapse.models.lora_train import Trainer as LoraTrainer
from mcollapse.models.twins import ensure_tiny_checkpoint
from mcollapse.report.output import RunRecorder
from mcollapse.run_dir import check_writable
from mcollapse.store import entry, sharded_pass
from mcollapse.store.checked import Unreadable, check_file
from mcollapse.store.space import StoreFull
from tests.helpers import mcollapse, model_cfg, run_experiment, wav_records

DATASET = {"name": "clips", "fingerprint": "f" * 16}
SMALL = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
         "dataset.generate_options.n_per_class=8", "dataset.max_samples=48"]


class _Hook:
    name, roles, llm_layer, pooling = "default", ["adapter_output", "llm_final"], 16, "all"


@pytest.fixture(scope="module")
def family(cache_dir):
    return load_model(model_cfg("tiny_qwen2audio", batch_size=2), cache_dir, "cpu")


@pytest.fixture()
def records(tmp_path):
    return wav_records(tmp_path, [0.8, 1.2, 1.4, 1.0])


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


def _quarantined(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "quarantine").iterdir()) if (cache / "quarantine").is_dir() else []


def _one_of_each_format(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"json": root / "a.json", "npz": root / "a.npz", "npy": root / "a.npy", "h5": root / "a.h5",
             "safetensors": root / "a.safetensors", "pt": root / "a.pt"}
    files["json"].write_text(json.dumps({"key": "x" * 200}))
    np.savez(files["npz"], values=np.arange(500.0))
    np.save(files["npy"], np.arange(500.0))
    with h5py.File(files["h5"], "w") as f:
        f.create_dataset("values", data=np.arange(5000.0))
    save_file({"w": torch.arange(500.0)}, str(files["safetensors"]))
    torch.save({"w": torch.arange(500.0)}, files["pt"])
    return files


def test_every_format_reads_whole_and_a_truncated_copy_is_unreadable(tmp_path):
    for name, path in _one_of_each_format(tmp_path).items():
        check_file(path)
        _truncate(path)
        with pytest.raises(Unreadable) as broken:
            check_file(path)
        assert broken.value.path == path, name


def test_garbage_activations_entry_json_is_moved_aside_and_rewritten(family, records, tmp_path, caplog):
    first = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    record = tmp_path / "cache" / "activations" / first.key / "entry.json"
    record.write_text("{ not json")
    caplog.set_level(logging.WARNING)
    again = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    assert again.computed == 0 and str(record) in caplog.text and _quarantined(tmp_path / "cache")
    assert json.loads(record.read_text())["key"] == first.key


def test_a_truncated_twin_checkpoint_is_moved_aside_and_built_again(cache_dir, tmp_path, caplog):
    built = ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    copy = tmp_path / "cache" / "models" / built.name
    shutil.copytree(built, copy)
    weights = next(copy.glob("*.safetensors"))
    _truncate(weights)
    caplog.set_level(logging.WARNING)
    assert ensure_tiny_checkpoint("tiny_qwen2audio", tmp_path / "cache") == copy
    assert str(copy) in caplog.text and len(_quarantined(tmp_path / "cache")) == 1
    check_file(weights)  # whole again
    load_model(model_cfg("tiny_qwen2audio"), tmp_path / "cache", "cpu")


@pytest.mark.parametrize("trainer, kind, state", [
    (ProjectorTrainer, "projectors", {"projector": {}, "optimizer": {}, "schedule": {}, "outcome": {"step": 3}}),
    (LoraTrainer, "lora", {"adapter": {}, "optimizer": {}, "outcome": {"history": [1.0]}}),
])
def test_a_truncated_training_state_is_moved_aside_and_training_starts_over(trainer, kind, state, tmp_path, caplog):
    state_dir = tmp_path / "cache" / kind / "0123456789abcdef"
    state_dir.mkdir(parents=True)
    torch.save({**state, "padding": torch.zeros(2000)}, state_dir / "state.pt")
    _truncate(state_dir / "state.pt")
    caplog.set_level(logging.WARNING)
    fresh = trainer._resume(SimpleNamespace(state_dir=state_dir, decoder=SimpleNamespace(device="cpu")))
    assert fresh == type(fresh)() and not (state_dir / "state.pt").exists()
    assert str(state_dir / "state.pt") in caplog.text and len(_quarantined(tmp_path / "cache")) == 1


def _pass(cache: Path, n_batches: int = 3, fail_at: int | None = None) -> RunRecorder:
    """A small gmi_scores-kind sharded pass; `fail_at`: that batch's write finds the disk full."""
    rec = RunRecorder(cache.parent / "run", {"experiment": "test", "model": "m", "dataset": "d"})
    batches = [np.arange(b * 2, b * 2 + 2) for b in range(n_batches)]

    def compute(rows):
        if fail_at is not None and rows[0] == fail_at * 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return {"scores": rows.astype(float) * 10}

    sharded_pass(rec, entry(cache, "gmi_scores", {"test": 1}).path, batches, "gmi_scores", compute, cache, {"test": 1})
    return rec


def test_a_full_disk_during_a_store_write_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    import mcollapse.store.atomic as atomic

    real = atomic.publish
    calls = []

    def full_on_the_second(tmp, final):
        calls.append(final)
        if Path(final).name == "batch-00001.npz":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, final)

    monkeypatch.setattr(atomic, "publish", full_on_the_second)
    with pytest.raises(StoreFull, match="no space left on the device to write .*batch-00001.npz") as full:
        _pass(tmp_path / "cache")
    assert "\n" not in str(full.value) and "re-running the same command resumes" in str(full.value)
    root = entry(tmp_path / "cache", "gmi_scores", {"test": 1}).path
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["batch-00000.npz", "entry.json"]
    monkeypatch.setattr(atomic, "publish", real)
    assert _pass(tmp_path / "cache").counts["gmi_scores_batches_from_cache"] == 1


def test_a_full_disk_during_extraction_is_one_line_with_the_space_needed_and_keeps_the_shards(
        family, records, tmp_path, monkeypatch):
    import mcollapse.store.space as space

    real = shutil.disk_usage
    flushes = []

    def nearly_full(path):
        flushes.append(path)
        usage = real(path)
        return usage._replace(free=40_000) if len(flushes) > 1 else usage

    monkeypatch.setattr(space.shutil, "disk_usage", nearly_full)
    with pytest.raises(StoreFull, match=r"needs about [\d.]+ MB, 0\.0 MB free") as full:
        extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache", flush_every=2)
    assert "\n" not in str(full.value) and "/shards/shard-" in str(full.value)
    monkeypatch.setattr(space.shutil, "disk_usage", real)
    again = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache", flush_every=2)
    assert again.computed == 2  # the first shard's two rows were kept


def test_an_hdf5_write_failing_for_space_is_one_line(family, records, tmp_path, monkeypatch):
    import mcollapse.extraction.cache as activation_cache

    def full(*args, **kwargs):
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(activation_cache.h5py, "File", full)
    with pytest.raises(StoreFull, match="no space left on the device to write"):
        extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def _fake_entries(cache: Path) -> Path:
    """Two gmi_scores passes; returns the first one's directory."""
    _pass(cache)
    rec = RunRecorder(cache.parent / "run2", {"experiment": "test", "model": "m", "dataset": "d"})
    sharded_pass(rec, entry(cache, "gmi_scores", {"test": 2}).path, [np.arange(2)], "gmi_scores",
                 lambda rows: {"scores": rows * 1.0}, cache, {"test": 2})
    return entry(cache, "gmi_scores", {"test": 1}).path


def test_prune_skips_an_entry_whose_lock_another_run_holds(tmp_path, env):
    user = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "cache")}
    held_entry = _fake_entries(tmp_path / "cache")
    with open(held_entry / ".lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another run mid-computation
        run_experiment(["experiment=cache", "cache.action=prune", "cache.kind=gmi_scores", "cache.dry_run=false"],
                       tmp_path, user)
        assert held_entry.is_dir() and (held_entry / "batch-00000.npz").is_file()
    assert [p for p in (tmp_path / "cache" / "gmi_scores").iterdir() if not p.name.startswith(".")] == [held_entry]


def test_prune_of_a_read_only_cache_is_one_line(tmp_path, env, monkeypatch):
    user = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "cache")}
    held_entry = _fake_entries(tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    monkeypatch.setattr(Path, "rename", refuse)
    outcome = run_experiment(["experiment=cache", "cache.action=prune", "cache.kind=gmi_scores",
                              "cache.dry_run=false"], tmp_path, user, check=False)
    assert outcome.exit_code == EXIT_USER_ERROR and "read-only: cannot prune" in outcome.error
    assert "\n" not in outcome.error and held_entry.is_dir()


def test_a_run_dir_in_a_read_only_directory_is_one_line(tmp_path, monkeypatch):
    import mcollapse.run_dir as run_dir

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_dir.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match="is not writable") as error:
        check_writable(tmp_path / "outputs" / "probe")
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, env):
    (tmp_path / "taken").write_text("")
    proc = mcollapse(["experiment=cache", f"hydra.run.dir={tmp_path / 'taken'}"], tmp_path, env, check=False)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr
    taken = tmp_path / "taken"
    assert proc.stderr.strip().splitlines() == [f"mcollapse: error: cannot create the run directory {taken}: {taken} "
                                                "is a file (move it, or set hydra.run.dir to another directory)"]


def _small_cache(tmp_path: Path, env: dict, cache_dir: Path) -> dict:
    """extract and modes on the tiny model, into a cache of their own (its checkpoint a copy)."""
    user = {**env, "MCOLLAPSE_CACHE": str(tmp_path / "cache"), "MCOLLAPSE_DATA": str(tmp_path / "data")}
    built = ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    shutil.copytree(built, tmp_path / "cache" / "models" / built.name)
    run_experiment(["experiment=extract", *SMALL, "experiment.text.source=none"], tmp_path, user)
    run_experiment(["experiment=modes", *SMALL], tmp_path, user)
    return user


@pytest.mark.slow
def test_verify_names_a_broken_file_of_every_kind_and_reruns_recover(tmp_path, env, cache_dir, caplog):
    user = _small_cache(tmp_path, env, cache_dir)
    cache = tmp_path / "cache"
    run_experiment(["experiment=cache", "cache.action=verify"], tmp_path, user)
    projector_state = cache / "projectors" / "0123456789abcdef" / "state.pt"
    projector_state.parent.mkdir(parents=True)
    torch.save({"projector": {"w": torch.zeros(1000)}}, projector_state)
    _pass(cache)
    broken = {"json": next(cache.glob("activations/*/entry.json")),
              "h5": next(cache.glob("activations/*/activations.h5")),
              "npz": next(cache.glob("modes/*.npz")),
              "npy": next(cache.glob("sequences/*/*.npy")),
              "safetensors": next(cache.glob("models/*/*.safetensors")),
              "pt": projector_state,
              "shard": next(cache.glob("gmi_scores/*/batch-00001.npz"))}
    for path in broken.values():
        _truncate(path, 0.3)
    caplog.set_level(logging.ERROR)
    outcome = run_experiment(["experiment=cache", "cache.action=verify"], tmp_path, user, check=False)
    assert outcome.exit_code == EXIT_CHECKS_FAILED
    for kind, path in broken.items():
        assert f"unreadable {path.name}" in caplog.text, kind
    caplog.clear()
    caplog.set_level(logging.WARNING)
    # the re-runs move every broken file they read aside and compute it again
    run_experiment(["experiment=modes", *SMALL], tmp_path, user)
    run_experiment(["experiment=extract", *SMALL, "experiment.text.source=none"], tmp_path, user)
    for kind in ("json", "h5", "npz", "npy"):
        assert f"corrupt cache file {broken[kind]} " in caplog.text, kind
    assert f"corrupt cache file {broken['safetensors'].parent} " in caplog.text  # the checkpoint, built again


def test_a_full_disk_while_saving_training_state_is_one_line(tmp_path, monkeypatch):
    """torch reports a failed write as a RuntimeError from its zip writer, not an OSError."""
    import torch

    from mcollapse.store.space import StoreFull, save_torch

    def fails(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(StoreFull, match="no space left on the device to write .*state.pt"):
        save_torch({"a": 1}, tmp_path / "state.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written is left
    monkeypatch.undo()
    save_torch({"a": torch.ones(2)}, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt")["a"].sum() == 2
