"""The store API: atomic publication, the lock and its logged wait, resumable sharded passes,
quarantine of a corrupt entry, a read-only store, and content keys for media."""

from __future__ import annotations

import errno
import logging
import os
import threading

import filelock
import numpy as np
import pytest

from mcollapse import store
from mcollapse.report.output import RunRecorder
from mcollapse.store.build import build_once
from mcollapse.store.digest import ContentDigests
from mcollapse.store.lock import ReadOnlyStore


def test_a_failed_write_publishes_nothing_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "file.json"
    with pytest.raises(RuntimeError):
        with store.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "deep").iterdir()) == []
    store.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}' and list((tmp_path / "deep").iterdir()) == [target]


def test_a_directory_is_swapped_in_whole_and_built_once(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "weights").write_bytes(b"w" * 10)

    target = tmp_path / "models" / "m-1"
    assert build_once(target, build, lambda p: p.is_dir(), "m") is True
    assert build_once(target, build, lambda p: p.is_dir(), "m") is False
    assert len(calls) == 1 and (target / "weights").read_bytes() == b"w" * 10
    assert sorted(p.name for p in target.parent.iterdir()) == [".m-1.lock", "m-1"]
    assert not list(target.parent.glob(".tmp-*"))


def test_keys_are_canonical_and_the_ids_digest_is_one_function():
    assert store.key({"a": 1, "b": [1, 2]}) == store.key({"b": [1, 2], "a": 1})
    assert store.key({"a": 1}) != store.key({"a": 2})
    assert store.ids_digest(["a", "b"]) != store.ids_digest(["b", "a"]) and len(store.ids_digest(["a"])) == 16
    assert store.texts_digest(["ab", "c"]) != store.texts_digest(["a", "bc"])


def test_every_kind_is_declared_once_with_its_key_fields():
    for name in ("activations", "sequences", "modes", "gradients", "ablation", "msswap", "lipschitz_summary",
                 "lora", "checkpoints", "datasets", "projectors"):
        assert store.kind(name).key_fields
    entry = store.entry("/c", "modes", {"x": 1}, suffix=".npz")
    assert entry.path.parent.name == "modes" and entry.path.name == f"{entry.key}.npz"
    with pytest.raises(ValueError, match="unknown store kind"):
        store.entry("/c", "nonsense", {})


def test_a_wait_on_the_lock_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mcollapse.store.lock")
    lock_file = tmp_path / "e" / ".lock"
    lock_file.parent.mkdir()
    holder = filelock.FileLock(str(lock_file))
    holder.acquire()
    entered = threading.Event()

    def waiter():
        with store.lock(lock_file, "activations abc"):
            entered.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not entered.wait(0.3)
    holder.release()
    thread.join(5)
    assert entered.is_set() and "waiting for another process computing activations abc" in caplog.text


def test_a_read_only_store_is_one_line_naming_what_it_cannot_write(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    with pytest.raises(ReadOnlyStore, match=r"not writable: cannot store gradients k1") as error:
        with store.lock(tmp_path / "gradients" / "k1" / ".lock", "gradients k1"):
            pass
    assert "\n" not in str(error.value)


def _pass(tmp_path, calls, fail_at=None):
    def compute(rows):
        if fail_at is not None and int(rows[0]) == fail_at:
            raise KeyboardInterrupt
        calls.append(int(rows[0]))
        return {"double": np.asarray(rows) * 2.0}

    rec = RunRecorder(tmp_path / "run", {})
    batches = [np.array([4, 5]), np.array([0, 1]), np.array([2, 3])]
    gather = store.sharded_pass(rec, tmp_path / "cache" / "gradients" / "k", batches, "pass", compute,
                                tmp_path / "cache", {"fields": 1})
    return gather, rec


def test_an_interrupted_pass_resumes_and_a_corrupt_shard_is_quarantined(tmp_path, caplog):
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        _pass(tmp_path, calls, fail_at=2)
    assert calls == [4, 0]
    calls.clear()
    gather, rec = _pass(tmp_path, calls)
    assert calls == [2] and rec.counts["pass_batches_from_cache"] == 2
    np.testing.assert_array_equal(gather("double"), np.arange(6) * 2.0)
    shard = tmp_path / "cache" / "gradients" / "k" / "batch-00001.npz"
    shard.write_bytes(shard.read_bytes()[:20])
    calls.clear()
    caplog.set_level(logging.WARNING)
    gather, _ = _pass(tmp_path, calls)
    assert calls == [0] and str(shard) in caplog.text
    assert len(list((tmp_path / "cache" / "quarantine").iterdir())) == 1
    np.testing.assert_array_equal(gather("double"), np.arange(6) * 2.0)


def test_media_digests_follow_content_even_at_the_same_size(tmp_path):
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"\x01" * 64)
    memo = tmp_path / "media" / "d.json"
    digests = ContentDigests(memo)
    first = digests(clip)
    digests.save()
    assert ContentDigests(memo)._memo  # kept between runs
    clip.write_bytes(b"\x00" * 64)  # same size, new bytes: a new mtime
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 1_000_000))
    assert ContentDigests(memo)(clip) != first
