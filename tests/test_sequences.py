"""The adapter-sequence cache: equal to what extraction pools, computed once, skips counted."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import soundfile

from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.extract import extract_modal
from mcollapse.extraction.sequences import adapter_sequences
from mcollapse.models import load_model
from tests.helpers import audio_samples, model_cfg, wav_records

DATASET = {"name": "clips", "fingerprint": "f" * 16}


@pytest.fixture(scope="module")
def family(cache_dir):
    return load_model(model_cfg("tiny_qwen2audio", batch_size=3), cache_dir, "cpu")


@pytest.fixture()
def records(tmp_path):
    return wav_records(tmp_path, [0.8, 2.2, 1.4, 3.0, 1.1])


class _Hook:
    name, roles, llm_layer, pooling = "default", ["adapter_output"], 16, "all"


def test_pooled_sequences_equal_the_extracted_adapter_vectors(family, records, tmp_path):
    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    assert sequences.ids == [r.id for r in records] and sequences.computed == len(records)
    lengths = [len(a) for a in sequences.arrays]
    assert lengths == sorted(lengths, key=lambda n: lengths.index(n)) and len(set(lengths)) > 1
    pooled = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache").activations
    np.testing.assert_allclose(sequences.pooled(), pooled.vectors["adapter_output"], rtol=1e-3, atol=1e-4)


def test_second_call_computes_nothing_and_subsets_share_entries(family, records, tmp_path):
    first = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    again = adapter_sequences(family, records[1:4], DATASET, tmp_path / "cache")
    assert again.computed == 0 and again.key == first.key
    for sample_id, array in zip(again.ids, again.arrays):
        np.testing.assert_array_equal(array, first.arrays[first.ids.index(sample_id)])
    other = adapter_sequences(family, records, {**DATASET, "fingerprint": "0" * 16}, tmp_path / "cache")
    assert other.key != first.key and other.computed == len(records)
    assert not list((tmp_path / "cache" / "sequences" / first.key).glob(".tmp-*"))


def test_unreadable_clip_is_skipped_and_counted_or_fatal_when_strict(family, records, tmp_path):
    records[2].path.write_bytes(b"RIFF broken")
    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    assert records[2].id not in sequences.ids and list(sequences.skipped) == [records[2].id]
    assert adapter_sequences(family, records, DATASET, tmp_path / "cache").computed == 0  # the skip is cached
    with pytest.raises(UserError, match="unreadable"):
        adapter_sequences(family, records, DATASET, tmp_path / "cache2", strict=True)


def test_gradient_pass_resumes_from_its_shards_with_identical_results(family, records, tmp_path):
    from types import SimpleNamespace

    from mcollapse.models.decoder import Decoder
    from mcollapse.pipeline.decoder_side import DecoderInputs, gradients
    from mcollapse.report.output import RunRecorder

    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    inputs = DecoderInputs(family, Decoder(family), sequences, {r.id: r.text for r in records}, DATASET,
                           tmp_path / "cache")
    target = SimpleNamespace(name="content", reduction="sum")
    rec = RunRecorder(tmp_path / "run", {})
    first = gradients(inputs, rec, sequences.ids, target, 2)
    shards = sorted((tmp_path / "cache" / "gradients").glob("*/batch-*.npz"))
    assert len(shards) == 3 and rec.counts["gradients_batches_from_cache"] == 0
    shards[1].unlink()  # as if the run had been interrupted there
    again = gradients(inputs, rec, sequences.ids, target, 2)
    assert rec.counts["gradients_batches_from_cache"] == 2
    np.testing.assert_allclose(again.norms, first.norms, rtol=1e-6)
    np.testing.assert_array_equal(again.n_scored, first.n_scored)
    assert again.ids == sequences.ids and np.all(first.norms > 0)


def test_gradient_pass_keeps_the_shared_shift_norm_and_versions_its_shards(family, records, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mcollapse.models.decoder import Decoder
    from mcollapse.pipeline import decoder_side as llm_side
    from mcollapse.report.output import RunRecorder

    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    inputs = llm_side.DecoderInputs(family, Decoder(family), sequences, {r.id: r.text for r in records}, DATASET,
                                    tmp_path / "cache")
    target = SimpleNamespace(name="content", reduction="sum")
    rec = RunRecorder(tmp_path / "run", {})
    grads = llm_side.gradients(inputs, rec, sequences.ids, target, 2)
    assert grads.shift_norms.shape == grads.norms.shape and np.all(grads.shift_norms > 0)
    # ||sum_t g_t|| <= sqrt(T) ||g||_F (Cauchy-Schwarz over the T positions)
    assert np.all(grads.shift_norms <= np.sqrt(grads.lengths) * grads.norms * (1 + 1e-5))
    monkeypatch.setattr(llm_side, "GRADIENT_SHARDS_VERSION", llm_side.GRADIENT_SHARDS_VERSION + 1)
    llm_side.gradients(inputs, rec, sequences.ids, target, 2)
    assert rec.counts["gradients_batches_from_cache"] == 0  # other shard contents: not reused
    assert len(list((tmp_path / "cache" / "gradients").iterdir())) == 2


def test_secant_scores_pair_each_target_with_its_neighbours_representation(family, tmp_path):
    from types import SimpleNamespace

    from mcollapse.analysis.lipschitz import equal_length_neighbours
    from mcollapse.models.decoder import Decoder, compose, pad_sequences
    from mcollapse.pipeline import decoder_side as llm_side
    from mcollapse.report.output import RunRecorder

    records = []
    for sample in audio_samples([1.0, 1.0, 1.0, 2.0], seed=3):  # three of one length, one alone
        path = tmp_path / f"{sample.id}.wav"
        soundfile.write(path, sample.audio, 16_000)
        records.append(Record(id=sample.id, path=path, modality="audio", text=sample.record.text))
    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    inputs = llm_side.DecoderInputs(family, Decoder(family), sequences, {r.id: r.text for r in records}, DATASET,
                                    tmp_path / "cache")
    target = SimpleNamespace(name="content", reduction="sum")
    ids = sequences.ids
    neighbours, _ = equal_length_neighbours(sequences.arrays, k=2)
    assert (neighbours[:3] >= 0).all() and (neighbours[3] == -1).all()
    own, other = llm_side.secant_scores(inputs, ids, neighbours, target, batch_size=2)
    grads = llm_side.gradients(inputs, RunRecorder(tmp_path / "run", {}), ids, target, 2)
    np.testing.assert_allclose(own[:3], grads.scores[:3], rtol=1e-4)  # l_i(z_i): the gradient pass's score
    assert np.isnan(own[3]) and np.isnan(other[3]).all()
    i, j = 0, int(neighbours[0, 1])
    batch = compose(family, [len(sequences.arrays[j])], [inputs.answer(ids[i])], "content", "sum")
    direct = float(inputs.decoder.scores(batch, pad_sequences([sequences.arrays[j]])).detach()[0])
    assert other[0, 1] == pytest.approx(direct, rel=1e-4)  # sample 0's target with its neighbour's z
    assert other[0, 1] != pytest.approx(own[j], rel=1e-6)  # not the neighbour's own target


def test_job_waiting_on_the_lock_finds_the_sequences_and_computes_nothing(family, records, tmp_path):
    """Two jobs released together: one runs the encoder, the other waits on the entry's lock, then reads.
    Threads suffice: flock excludes two opens of the lock file in one process as it does two processes."""
    barrier = threading.Barrier(2)
    results = [None, None]

    def job(slot):
        barrier.wait(30)
        results[slot] = adapter_sequences(family, records, DATASET, tmp_path / "cache")

    threads = [threading.Thread(target=job, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.computed for r in results) == [0, len(records)]
    assert results[0].ids == results[1].ids == [r.id for r in records]
    for first, second in zip(results[0].arrays, results[1].arrays):
        np.testing.assert_array_equal(first, second)
    assert (tmp_path / "cache" / "sequences" / results[0].key / ".lock").is_file()


def test_a_clip_too_short_for_one_adapter_frame_is_skipped_not_stored_empty(family, records, tmp_path):
    soundfile.write(records[1].path, soundfile.read(records[0].path, dtype="float32")[0][:10], 16_000)
    sequences = adapter_sequences(family, records, DATASET, tmp_path / "cache")
    reason = sequences.skipped[records[1].id]
    assert records[1].id not in sequences.ids and reason == "a1.wav: too short: no adapter_output frame"
    assert all(len(a) for a in sequences.arrays)
    with pytest.raises(UserError, match=r"a1 .*too short"):
        adapter_sequences(family, records, DATASET, tmp_path / "cache2", strict=True)
