"""Concurrent jobs sharing a cache: each cached intermediate is computed once, the others wait, then read.

Two processes run the same sharded pass and the same eigenbasis at once (released together by a
barrier); every computation is logged to a file, so the tests count them across processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import filelock
import numpy as np
import pytest

from mcollapse.extraction.sequences import Sequences
from mcollapse.pipeline.decoder_side import modes
from mcollapse.report.output import RunRecorder
from mcollapse.store import lock as cache_lock
from mcollapse.store import sharded_pass

N_ROWS = 7
BATCH = 3
N_SAMPLES = 8
DIM = 6
N_MODES = 3
DELAY_S = 0.1
JOIN_TIMEOUT_S = 60


# ---------------------------------------------------------------------------- what each job runs


def _batches() -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(N_ROWS)
    return [order[s : s + BATCH] for s in range(0, N_ROWS, BATCH)]


def _batch(rows: np.ndarray, calls_log: Path) -> dict:
    with open(calls_log, "a") as handle:
        handle.write(" ".join(map(str, rows)) + "\n")
    time.sleep(DELAY_S)
    return {"value": rows * 10.0, "square": rows**2}


class _FakeInputs:
    """What `modes()` reads from DecoderInputs, with a text embedding that logs each call."""

    def __init__(self, cache_dir: Path, calls_log: Path):
        rng = np.random.default_rng(1)
        ids = [f"s{i}" for i in range(N_SAMPLES)]
        arrays = [rng.standard_normal((2 + i % 3, DIM)).astype(np.float32) for i in range(N_SAMPLES)]
        self.sequences = Sequences(ids, arrays, key="seq-key")
        self.family = type("Family", (), {"cfg": type("Cfg", (), {"name": "fake"})})()
        self.dataset = {"name": "clips"}
        self.texts = {i: f"text of {i}" for i in ids}
        self.decoder_key = "seq-key"
        self.cache_dir = cache_dir
        self._calls_log = calls_log

    def with_text(self, ids=None) -> list[str]:
        return list(ids or self.sequences.ids)

    def text_sequence(self, sample_id: str) -> np.ndarray:
        with open(self._calls_log, "a") as handle:
            handle.write(f"{sample_id}\n")
        time.sleep(DELAY_S / 4)
        digest = sum(map(ord, sample_id))
        return np.random.default_rng(digest).standard_normal((3, DIM))


def _job(cache_dir: Path, work: Path, name: str, barrier) -> None:
    rec = RunRecorder(work / name, {})
    barrier.wait(JOIN_TIMEOUT_S)
    gather = sharded_pass(rec, cache_dir / "pass" / "key", _batches(), "pass",
                          lambda rows: _batch(rows, work / "batches.log"))
    barrier.wait(JOIN_TIMEOUT_S)
    found = modes(_FakeInputs(cache_dir, work / "texts.log"), rec, N_MODES, 0.5, rho_normalization="none")
    np.savez(work / f"{name}.npz", value=gather("value"), square=gather("square"), vectors=found.basis.vectors,
             rho=found.alignment.rho)
    (work / f"{name}.json").write_text(json.dumps({"counts": rec.counts, "modes_path": str(found.path)}))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    """Two jobs started together on one cache: (work dir, their counts/paths, their arrays).

    One job is a spawned process, the other this one (a second spawned interpreter would double the
    time spent importing torch)."""
    work = tmp_path_factory.mktemp("jobs")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    other = context.Process(target=_job, args=(work / "cache", work, "job1", barrier))
    other.start()
    try:
        _job(work / "cache", work, "job0", barrier)
    finally:
        other.join(JOIN_TIMEOUT_S)
    assert other.exitcode == 0
    reports = [json.loads((work / f"job{i}.json").read_text()) for i in range(2)]
    arrays = []
    for i in range(2):
        with np.load(work / f"job{i}.npz") as data:
            arrays.append({name: data[name] for name in data.files})
    return work, reports, arrays


# ---------------------------------------------------------------------------- tests


def test_cache_lock_blocks_other_holders_and_creates_its_folder(tmp_path, caplog):
    lock_file = tmp_path / "new" / "entry.lock"
    with cache_lock(lock_file):
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(lock_file)).acquire(timeout=0)

    caplog.set_level(logging.INFO, logger="mcollapse.store.lock")
    holder = filelock.FileLock(str(lock_file))
    holder.acquire(timeout=0)
    entered = threading.Event()

    def waiter():
        with cache_lock(lock_file):
            entered.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert not entered.wait(0.3)  # blocked while another holds it
    finally:
        holder.release()
    thread.join(5)
    assert entered.is_set() and "waiting for another process" in caplog.text


def test_concurrent_sharded_passes_compute_each_batch_once(jobs):
    work, reports, arrays = jobs
    calls = (work / "batches.log").read_text().splitlines()
    assert sorted(calls) == sorted(" ".join(map(str, rows)) for rows in _batches())  # each exactly once
    assert sorted(r["counts"]["pass_batches_from_cache"] for r in reports) == [0, len(_batches())]
    for name in ("value", "square"):
        np.testing.assert_array_equal(arrays[0][name], arrays[1][name])
    np.testing.assert_array_equal(arrays[0]["value"], np.arange(N_ROWS) * 10.0)
    assert not list((work / "cache" / "pass" / "key").glob(".tmp-*"))


def test_concurrent_modes_compute_the_eigenbasis_once(jobs):
    work, reports, arrays = jobs
    calls = (work / "texts.log").read_text().splitlines()
    assert sorted(calls) == sorted(f"s{i}" for i in range(N_SAMPLES))  # one job embedded the texts, once
    assert reports[0]["modes_path"] == reports[1]["modes_path"] and Path(reports[0]["modes_path"]).is_file()
    for name in ("vectors", "rho"):
        np.testing.assert_array_equal(arrays[0][name], arrays[1][name])
