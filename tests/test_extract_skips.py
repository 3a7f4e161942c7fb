"""Extraction skips and counts what a model cannot pool (a clip too short for one encoder frame)
and warns when a hook gives every sample the same vector."""

from __future__ import annotations

import logging

import pytest
import soundfile

from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.extract import extract_modal
from mcollapse.models import load_model
from tests.helpers import audio_samples, model_cfg

DATASET = {"name": "clips", "fingerprint": "e" * 16}


class _Hook:
    name, roles, llm_layer, pooling = "default", ["encoder_output", "adapter_output"], 16, "all"


@pytest.fixture(scope="module")
def family(cache_dir):
    return load_model(model_cfg("tiny_qwen2audio", batch_size=4), cache_dir, "cpu")


def _records(tmp_path, waves) -> list[Record]:
    out = []
    for i, wave in enumerate(waves):
        path = tmp_path / f"c{i}.wav"
        soundfile.write(path, wave, 16_000)
        out.append(Record(id=f"c{i}", path=path, modality="audio"))
    return out


def test_a_clip_too_short_for_one_frame_is_skipped_and_counted(family, tmp_path):
    waves = [s.audio for s in audio_samples([0.6, 0.9, 0.7])]
    waves.insert(1, waves[0][:10])  # 0.6 ms: no encoder frame survives the downsampling
    records = _records(tmp_path, waves)
    extraction = extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    assert extraction.activations.ids == ["c0", "c2", "c3"]
    assert list(extraction.skipped) == ["c1"] and extraction.skipped["c1"].startswith("c1.wav: too short")
    with pytest.raises(UserError, match=r"c1.*c1\.wav.*too short"):
        extract_modal(family, records, DATASET, _Hook(), tmp_path / "strict-cache", strict=True)


def test_identical_vectors_at_a_hook_are_warned_about(family, tmp_path, caplog):
    wave = audio_samples([0.5])[0].audio
    records = _records(tmp_path, [wave, wave.copy(), wave.copy()])
    with caplog.at_level(logging.WARNING, logger="mcollapse.extraction.extract"):
        extract_modal(family, records, DATASET, _Hook(), tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if "identical" in r.getMessage()]
    assert any("adapter_output" in m and "all 3" in m for m in warned), warned
