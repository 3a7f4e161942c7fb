"""Activation store: round trip, validation, crash resume (kill -9) and inter-process locking.

Run as a script, this file is the worker the crash and lock tests start in subprocesses:
``python test_cache.py <cache_dir> <n_ids> <calls_log> <delay_s> <report_json>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

from mcollapse.extraction.cache import Activations, ActivationStore  # noqa: E402
from mcollapse.store.digest import FORMAT_VERSION  # noqa: E402
from mcollapse.store.digest import key as cache_key  # noqa: E402

HOOK_DIMS = {"encoder_output": 6, "llm_layer.16": 5}
BATCH = 3
FLUSH_EVERY = 8
SUBPROCESS_TIMEOUT_S = 60


# ---------------------------------------------------------------------------- shared worker


def sample_ids(n: int) -> list[str]:
    return [f"utt-{i:03d}" for i in range(n)]


def key_fields(ids: list[str]) -> dict:
    return {
        "model": "tiny-audio",
        "revision": "0123abc",
        "dataset": "synthetic_speech",
        "sample_ids": ids,
        "hooks": sorted(HOOK_DIMS),
        "pooling": "masked_mean",
    }


def vectors_for(batch: list[str]) -> dict[str, np.ndarray]:
    """Rows that depend only on the sample id, so any write order gives identical bytes."""
    vectors = {}
    for hook, dim in HOOK_DIMS.items():
        rows = []
        for sample_id in batch:
            digest = hashlib.sha256(f"{hook}/{sample_id}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            rows.append(rng.standard_normal(dim).astype(np.float32))
        vectors[hook] = np.stack(rows)
    return vectors


def is_unreadable(sample_id: str) -> bool:
    return sample_id.endswith("7")


def extract(
    cache_dir: Path, n: int, calls_log: Path, delay_s: float, announce: bool = False
) -> tuple[Activations, list]:
    """What an experiment does: lock, compute only pending rows, finalize, read.

    Every computed id is appended to ``calls_log`` before its row is added, so tests can count
    computations across processes. With ``announce``, a line on stdout says the store has been
    opened (and its shards scanned) before the lock is requested. Returns the activations and
    the ids this call computed.
    """
    ids = sample_ids(n)
    store = ActivationStore(cache_dir, key_fields(ids), ids, flush_every=FLUSH_EVERY)
    if announce:
        print("store opened", flush=True)
    computed: list[str] = []
    with store.lock():
        if not store.is_complete():
            pending = store.pending_ids()
            for start in range(0, len(pending), BATCH):
                batch = pending[start : start + BATCH]
                with open(calls_log, "a") as log_file:
                    log_file.write("".join(f"{sample_id}\n" for sample_id in batch))
                computed.extend(batch)
                for sample_id in filter(is_unreadable, batch):
                    store.add_skipped(sample_id, "unreadable audio")
                readable = [sample_id for sample_id in batch if not is_unreadable(sample_id)]
                if readable:
                    store.add(readable, vectors_for(readable))
                time.sleep(delay_s)
            store.finalize()
    return store.read(), computed


def run_worker(argv: list[str]) -> None:
    cache_dir, n, calls_log, delay_s, report = argv
    activations, computed = extract(
        Path(cache_dir), int(n), Path(calls_log), float(delay_s), announce=True
    )
    report_path = Path(report)
    np.savez(report_path.with_suffix(".npz"), **activations.vectors)
    report_path.write_text(
        json.dumps({"ids": activations.ids, "skipped": activations.skipped, "computed": computed})
    )


def start_worker(
    tmp_path: Path, cache_dir: Path, n: int, calls_log: Path, delay_s: float, name: str
) -> tuple[subprocess.Popen, Path]:
    python_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    report = tmp_path / f"{name}.json"
    process = subprocess.Popen(
        [sys.executable, __file__, *map(str, (cache_dir, n, calls_log, delay_s, report))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return process, report


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, output.decode()


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def entry_dir(cache_dir: Path, n: int) -> Path:
    return cache_dir / "activations" / cache_key(key_fields(sample_ids(n)))


def published_shards(cache_dir: Path, n: int) -> list[Path]:
    return sorted((entry_dir(cache_dir, n) / "shards").glob("shard-*.h5"))


def assert_identical(actual: Activations, expected: Activations) -> None:
    assert actual.ids == expected.ids
    assert actual.skipped == expected.skipped
    assert list(actual.vectors) == list(expected.vectors)
    for hook, array in expected.vectors.items():
        assert actual.vectors[hook].dtype == np.float32
        assert actual.vectors[hook].tobytes() == array.tobytes()


def reference(tmp_path: Path, n: int) -> Activations:
    activations, _ = extract(tmp_path / "reference_cache", n, tmp_path / "reference_calls", 0.0)
    return activations


def read_report(report: Path) -> tuple[Activations, list[str]]:
    payload = json.loads(report.read_text())
    with np.load(report.with_suffix(".npz")) as arrays:
        vectors = {hook: arrays[hook] for hook in HOOK_DIMS}
    activations = Activations(payload["ids"], vectors, payload["skipped"], key_fields={})
    return activations, payload["computed"]


# ---------------------------------------------------------------------------- keys


def test_cache_key_is_canonical_and_versioned():
    fields = {"model": "m", "revision": "r", "sample_ids": ["a", "b"], "hooks": ["x"]}
    reordered = dict(reversed(list(fields.items())))
    assert cache_key(fields) == cache_key(reordered)
    assert cache_key(fields) != cache_key({**fields, "sample_ids": ["b", "a"]})
    assert cache_key(fields) != cache_key({**fields, "revision": "r2"})
    assert len(cache_key(fields)) == 16
    with pytest.raises(ValueError, match="reserved"):
        cache_key({**fields, "cache_format_version": FORMAT_VERSION})
    with pytest.raises(TypeError, match="JSON"):
        cache_key({"model": object()})


def test_entry_records_key_fields_and_rejects_other_sample_selection(tmp_path):
    ids = sample_ids(4)
    store = ActivationStore(tmp_path, {"model": "m"}, ids)
    assert store.path == tmp_path / "activations" / store.key
    entry = json.loads((store.path / "entry.json").read_text())
    assert entry["key_fields"] == {"model": "m"}
    assert entry["format_version"] == FORMAT_VERSION
    with pytest.raises(ValueError, match="sample selection"):
        ActivationStore(tmp_path, {"model": "m"}, ids[:3])


# ---------------------------------------------------------------------------- round trip


def test_round_trip_in_original_order_regardless_of_write_order(tmp_path):
    n = 30
    ids = sample_ids(n)
    store = ActivationStore(tmp_path, key_fields(ids), ids, flush_every=4)
    write_order = list(np.random.default_rng(0).permutation(ids))
    skipped = {write_order[0]: "decode error", write_order[17]: "too long"}
    rows = [i for i in write_order if i not in skipped]
    for start in range(0, len(rows), 5):
        store.add(rows[start : start + 5], vectors_for(rows[start : start + 5]))
    for sample_id, reason in skipped.items():
        store.add_skipped(sample_id, reason)
    assert store.pending_ids() == []
    assert not store.is_complete()
    store.finalize()
    assert store.is_complete()
    assert not (store.path / "shards").exists()

    expected_ids = [i for i in ids if i not in skipped]
    for reader in (store, ActivationStore(tmp_path, key_fields(ids), ids)):
        activations = reader.read()
        assert activations.ids == expected_ids
        assert activations.skipped == skipped
        assert activations.key_fields == key_fields(ids)
        assert list(activations.vectors) == list(HOOK_DIMS)
        expected = vectors_for(expected_ids)
        for hook, dim in HOOK_DIMS.items():
            assert activations.vectors[hook].shape == (n - len(skipped), dim)
            assert activations.vectors[hook].tobytes() == expected[hook].tobytes()
    assert list(store.read(hooks=["llm_layer.16"]).vectors) == ["llm_layer.16"]


def test_pending_ids_keep_original_order_and_survive_reopen(tmp_path):
    ids = sample_ids(10)
    store = ActivationStore(tmp_path, key_fields(ids), ids, flush_every=100)
    store.add(["utt-005", "utt-001"], vectors_for(["utt-005", "utt-001"]))
    store.add_skipped("utt-003", "silent")
    assert store.pending_ids() == [i for i in ids if i not in {"utt-001", "utt-003", "utt-005"}]
    reopened = ActivationStore(tmp_path, key_fields(ids), ids)
    assert reopened.pending_ids() == ids  # nothing flushed yet
    store.flush()
    reopened = ActivationStore(tmp_path, key_fields(ids), ids)
    assert reopened.pending_ids() == store.pending_ids()


def test_incomplete_store_refuses_read_and_finalize(tmp_path):
    ids = sample_ids(3)
    store = ActivationStore(tmp_path, key_fields(ids), ids)
    store.add(ids[:2], vectors_for(ids[:2]))
    with pytest.raises(ValueError, match="incomplete"):
        store.read()
    with pytest.raises(ValueError, match="utt-002"):
        store.finalize()
    assert not store.is_complete()


def test_all_samples_skipped_gives_empty_entry(tmp_path):
    ids = sample_ids(2)
    store = ActivationStore(tmp_path, key_fields(ids), ids)
    for sample_id in ids:
        store.add_skipped(sample_id, "missing file")
    store.finalize()
    activations = store.read()
    assert activations.ids == [] and activations.vectors == {}
    assert activations.skipped == {i: "missing file" for i in ids}


# ---------------------------------------------------------------------------- validation


def test_duplicate_and_unknown_ids_rejected(tmp_path):
    ids = sample_ids(12)
    store = ActivationStore(tmp_path, key_fields(ids), ids, flush_every=2)
    store.add(ids[:2], vectors_for(ids[:2]))  # flushed
    store.add(ids[2:3], vectors_for(ids[2:3]))  # buffered
    store.add_skipped(ids[3], "bad")
    for batch in (ids[1:2], ids[2:3], ids[3:4], [ids[5], ids[5]]):
        with pytest.raises(ValueError, match=batch[0]):
            store.add(batch, vectors_for(batch))
    with pytest.raises(ValueError, match="utt-000"):
        store.add_skipped(ids[0], "bad")
    with pytest.raises(ValueError, match="not in this cache entry"):
        store.add(["stranger"], vectors_for(["stranger"]))
    reopened = ActivationStore(tmp_path, key_fields(ids), ids)
    with pytest.raises(ValueError, match="utt-001"):
        reopened.add(ids[1:2], vectors_for(ids[1:2]))
    with pytest.raises(ValueError, match="unique"):
        ActivationStore(tmp_path / "other", {}, ["a", "a"])


def test_non_finite_rows_rejected_naming_ids_and_nothing_buffered(tmp_path):
    ids = sample_ids(4)
    store = ActivationStore(tmp_path, key_fields(ids), ids)
    vectors = vectors_for(ids[:3])
    vectors["encoder_output"][1, 2] = np.nan
    vectors["llm_layer.16"][2, 0] = np.inf
    with pytest.raises(ValueError, match=r"'utt-001', 'utt-002'") as error:
        store.add(ids[:3], vectors)
    assert "utt-000" not in str(error.value)
    assert store.pending_ids() == ids


def test_inconsistent_shapes_rejected(tmp_path):
    ids = sample_ids(6)
    store = ActivationStore(tmp_path, key_fields(ids), ids)
    good = vectors_for(ids[:2])
    with pytest.raises(ValueError, match="shape"):
        store.add(ids[:2], {**good, "llm_layer.16": good["llm_layer.16"][:1]})
    with pytest.raises(ValueError, match="shape"):
        store.add(ids[:2], {**good, "encoder_output": good["encoder_output"][0]})
    with pytest.raises(ValueError, match="floating"):
        store.add(ids[:2], {**good, "encoder_output": np.ones((2, 6), dtype=np.int64)})
    store.add(ids[:2], good)
    wider = vectors_for(ids[2:3])
    wider["encoder_output"] = np.zeros((1, 7), dtype=np.float32)
    with pytest.raises(ValueError, match="width"):
        store.add(ids[2:3], wider)
    with pytest.raises(ValueError, match="hooks"):
        store.add(ids[2:3], {"encoder_output": vectors_for(ids[2:3])["encoder_output"]})
    with pytest.raises(ValueError, match="HDF5"):
        store.add(ids[2:3], {"a/b": np.zeros((1, 2), dtype=np.float32)})


# ---------------------------------------------------------------------------- crash safety


def test_resume_after_kill_minus_nine_is_byte_identical(tmp_path):
    n = 120
    expected = reference(tmp_path, n)
    cache_dir = tmp_path / "cache"
    calls_log = tmp_path / "calls"
    process, _ = start_worker(tmp_path, cache_dir, n, calls_log, delay_s=0.05, name="killed")
    wait_for(lambda: len(published_shards(cache_dir, n)) >= 2, "two published shards")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL

    entry = entry_dir(cache_dir, n)
    assert not (entry / "activations.h5").exists()
    ids = sample_ids(n)
    plant_unpublished_files(tmp_path, entry, ids)
    fresh = ActivationStore(cache_dir, key_fields(ids), ids)
    assert not fresh.is_complete()
    pending = fresh.pending_ids()
    assert 0 < len(pending) < n - 2 * FLUSH_EVERY + 1
    assert pending == ids[n - len(pending) :]  # the killed run flushed a prefix: no gaps

    resumed, computed = extract(cache_dir, n, calls_log, delay_s=0.0)
    assert computed == pending
    assert_identical(resumed, expected)
    assert len(resumed.ids) == len(set(resumed.ids))
    assert sorted([*resumed.ids, *resumed.skipped], key=ids.index) == ids
    assert sorted(p.name for p in entry.iterdir()) == [".lock", "activations.h5", "entry.json"]


def plant_unpublished_files(tmp_path: Path, entry: Path, ids: list[str]) -> None:
    """Leave what writers killed mid-write leave: a truncated shard and final file, and a
    complete but never renamed (hence never fsynced) shard whose rows must not be trusted."""
    scratch = ActivationStore(tmp_path / "scratch", key_fields(ids), ids)
    zeros = {hook: np.zeros((len(ids), dim), np.float32) for hook, dim in HOOK_DIMS.items()}
    scratch.add(ids, zeros)
    scratch.flush()
    unpublished = next((scratch.path / "shards").glob("shard-*.h5")).read_bytes()
    (entry / "shards" / ".tmp-0-complete.h5").write_bytes(unpublished)
    (entry / "shards" / ".tmp-1-truncated.h5").write_bytes(unpublished[: len(unpublished) // 2])
    (entry / ".tmp-2-activations.h5").write_bytes(unpublished[: len(unpublished) // 2])


def test_unreadable_published_shard_is_recomputed(tmp_path, caplog):
    ids = sample_ids(8)
    store = ActivationStore(tmp_path, key_fields(ids), ids, flush_every=4)
    store.add(ids[:4], vectors_for(ids[:4]))
    shard = next((store.path / "shards").glob("shard-*.h5"))
    shard.write_bytes(shard.read_bytes()[:100])
    reopened = ActivationStore(tmp_path, key_fields(ids), ids)
    assert reopened.pending_ids() == ids
    assert "unreadable activation shard" in caplog.text


# ---------------------------------------------------------------------------- locking


def test_racing_processes_compute_each_row_once(tmp_path):
    n = 40
    cache_dir = tmp_path / "cache"
    calls_log = tmp_path / "calls"
    workers = [
        start_worker(tmp_path, cache_dir, n, calls_log, delay_s=0.01, name=f"racer{i}")
        for i in range(2)
    ]
    for process, _ in workers:
        finish(process)

    calls = calls_log.read_text().split()
    assert sorted(calls) == sample_ids(n)
    (first, first_computed), (second, second_computed) = (read_report(r) for _, r in workers)
    assert sorted([len(first_computed), len(second_computed)]) == [0, n]
    assert_identical(first, second)
    assert_identical(first, reference(tmp_path, n))


def test_waiting_process_resumes_when_lock_holder_is_killed(tmp_path):
    n = 120
    ids = sample_ids(n)
    cache_dir = tmp_path / "cache"
    calls_log = tmp_path / "calls"
    holder, _ = start_worker(tmp_path, cache_dir, n, calls_log, delay_s=0.1, name="holder")
    wait_for(lambda: len(published_shards(cache_dir, n)) >= 1, "the holder's first shard")
    waiter, report = start_worker(tmp_path, cache_dir, n, calls_log, delay_s=0.0, name="waiter")
    assert waiter.stdout.readline().strip() == b"store opened"
    # Shards published while the waiter waits must count too, not just those it saw on opening.
    seen_by_waiter = len(published_shards(cache_dir, n))
    wait_for(lambda: len(published_shards(cache_dir, n)) >= seen_by_waiter + 2, "two more shards")
    assert waiter.poll() is None, "the second process must wait for the lock"
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finish(waiter)

    resumed, computed = read_report(report)
    assert 0 < len(computed) < n
    assert computed == ids[n - len(computed) :]
    calls = calls_log.read_text().split()
    assert set(calls) == set(ids)
    # Only the holder's unflushed buffer and in-flight batch are computed twice: the waiter saw
    # every shard the holder published, including those published while it waited.
    assert len(calls) - n <= FLUSH_EVERY + BATCH
    assert_identical(resumed, reference(tmp_path, n))


def test_unlocked_writers_duplicating_rows_still_give_one_row_per_id(tmp_path):
    ids = sample_ids(4)
    first = ActivationStore(tmp_path, key_fields(ids), ids)
    second = ActivationStore(tmp_path, key_fields(ids), ids)
    first.add(ids, vectors_for(ids))
    first.flush()
    zeros = {hook: np.zeros((2, dim), np.float32) for hook, dim in HOOK_DIMS.items()}
    second.add(ids[:2], zeros)
    second.flush()
    ActivationStore(tmp_path, key_fields(ids), ids).finalize()
    activations = first.read()
    assert activations.ids == ids
    for hook, array in vectors_for(ids).items():
        assert activations.vectors[hook].tobytes() == array.tobytes()  # the earlier shard wins


def test_lock_times_out_while_held(tmp_path):
    ids = sample_ids(2)
    holder = ActivationStore(tmp_path, key_fields(ids), ids)
    other = ActivationStore(tmp_path, key_fields(ids), ids)
    with holder.lock():
        with pytest.raises(TimeoutError):
            with other.lock(timeout=0.1):
                pass
    with other.lock(timeout=1):
        assert other.pending_ids() == ids


def test_second_store_sees_completion_after_waiting(tmp_path):
    ids = sample_ids(5)
    first = ActivationStore(tmp_path, key_fields(ids), ids)
    second = ActivationStore(tmp_path, key_fields(ids), ids)
    with first.lock():
        first.add(ids, vectors_for(ids))
        first.finalize()
    assert second.is_complete() and second.pending_ids() == []
    assert_identical(second.read(), first.read())


if __name__ == "__main__":
    run_worker(sys.argv[1:])
