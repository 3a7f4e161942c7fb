"""Which samples the decoder-side experiments score: a seeded draw spread over speakers, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.sequences import Sequences
from mcollapse.pipeline.decoder_side import DecoderInputs, ids_digest, scored_ids
from mcollapse.report.output import RunRecorder

N_SPEAKERS, PER_SPEAKER = 20, 10


def _records(with_speaker: bool = True) -> list[Record]:
    """Ids that sort by speaker, as LibriSpeech's and CREMA-D's do."""
    return [Record(id=f"{s:04d}-{u:03d}", path=Path(f"{s}-{u}.flac"), modality="audio", text=f"words {s} {u}",
                   fields={"speaker_id": str(s)} if with_speaker else {})
            for s in range(N_SPEAKERS) for u in range(PER_SPEAKER)]


def _inputs(records: list[Record], seed: int = 0, **extra) -> DecoderInputs:
    ids = [r.id for r in records]
    sequences = Sequences(ids, [np.zeros((2, 3), dtype=np.float32) for _ in ids], key="seq")
    return DecoderInputs(None, None, sequences, {r.id: r.text or "" for r in records}, {"name": "clips"},
                         Path("unused"), records={r.id: r for r in records}, seed=seed, **extra)


def _speakers(ids: list[str]) -> int:
    return len({i.split("-")[0] for i in ids})


@pytest.mark.parametrize("n", [5, 30, 100])
def test_scored_samples_span_many_speakers(tmp_path, n):
    chosen = scored_ids(_inputs(_records()), "content", n, RunRecorder(tmp_path, {}))
    assert len(chosen) == n
    assert _speakers(chosen) >= min(n, N_SPEAKERS) / 2


def test_draw_is_deterministic_and_nested(tmp_path):
    records = _records()
    first = scored_ids(_inputs(records), "content", 40, RunRecorder(tmp_path / "a", {}))
    again = scored_ids(_inputs(list(reversed(records))), "content", 40, RunRecorder(tmp_path / "b", {}))
    assert first == again and first == sorted(first)
    smaller = scored_ids(_inputs(records), "content", 20, RunRecorder(tmp_path / "c", {}))
    assert set(smaller) <= set(first)
    other_seed = scored_ids(_inputs(records, seed=1), "content", 40, RunRecorder(tmp_path / "d", {}))
    assert other_seed != first


def test_choice_is_recorded_in_the_summary_and_the_run_dir(tmp_path):
    rec = RunRecorder(tmp_path, {"experiment": "x"})
    chosen = scored_ids(_inputs(_records()), "content", 30, rec)
    rec.write([], {"n_samples": len(chosen)})
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["scored_ids_digest"] == ids_digest(chosen)
    assert summary["n_speakers"] == _speakers(chosen) == N_SPEAKERS
    assert (tmp_path / "scored_ids.txt").read_text().split() == chosen


def test_no_speaker_field_gives_no_speaker_count(tmp_path):
    rec = RunRecorder(tmp_path, {})
    chosen = scored_ids(_inputs(_records(with_speaker=False)), "content", 30, rec)
    assert len(chosen) == 30 and rec.summary_fields["n_speakers"] is None


def test_all_samples_when_n_covers_them(tmp_path):
    records = _records()
    assert scored_ids(_inputs(records), "reference", None, RunRecorder(tmp_path, {})) == [r.id for r in records]


def test_among_restricts_the_candidates(tmp_path):
    records = _records()
    allowed = {r.id for r in records if int(r.fields["speaker_id"]) % 2 == 0}
    chosen = scored_ids(_inputs(records), "content", 25, RunRecorder(tmp_path, {}), among=allowed)
    assert len(chosen) == 25 and set(chosen) <= allowed and _speakers(chosen) == N_SPEAKERS // 2


def test_nothing_to_score_is_a_user_error(tmp_path):
    records = [Record(id=f"x{i}", path=Path("x"), modality="audio", text="") for i in range(3)]
    with pytest.raises(UserError, match="transcript"):
        scored_ids(_inputs(records), "content", 2, RunRecorder(tmp_path, {}))


def test_clips_cut_to_the_window_are_not_scored_against_their_full_transcript(tmp_path):
    records = _records()
    cut = frozenset(r.id for r in records[:PER_SPEAKER])  # the first speaker's clips are long
    rec = RunRecorder(tmp_path / "a", {})
    chosen = scored_ids(_inputs(records, cut_ids=cut), "content", None, rec)
    assert set(chosen) == {r.id for r in records} - cut and rec.counts["n_cut_clips_skipped"] == len(cut)
    kept = scored_ids(_inputs(records, cut_ids=cut, keep_cut_clips=True), "content", None,
                      RunRecorder(tmp_path / "b", {}))
    assert len(kept) == len(records)
    reference = RunRecorder(tmp_path / "c", {})  # the prompt target does not score the transcript
    assert len(scored_ids(_inputs(records, cut_ids=cut), "reference", None, reference)) == len(records)
    assert reference.counts["n_cut_clips_skipped"] == 0


@pytest.mark.parametrize("n", [0, -3])
def test_sample_count_below_one_is_a_user_error(tmp_path, n):
    with pytest.raises(UserError, match="must be positive"):
        scored_ids(_inputs(_records()), "content", n, RunRecorder(tmp_path, {}))
