"""Tiny twins load through the real families' classes and behave like them where hooks look."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
)

from mcollapse.models.twins import TINY_MODELS, ensure_tiny_checkpoint
from mcollapse.models.twins import build as tiny

MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
LLM_HOOK_LAYER = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_cache")


@pytest.fixture(scope="module")
def checkpoints(cache_dir) -> dict[str, Path]:
    return {name: ensure_tiny_checkpoint(name, cache_dir) for name in TINY_MODELS}


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def forward_capturing(model: torch.nn.Module, inputs, modules: dict[str, torch.nn.Module]):
    """A full forward (logits included) that also keeps each named module's (first) output."""
    captured: dict[str, torch.Tensor] = {}

    def keeper(key):
        def hook(_module, _inputs, output):
            captured[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(keeper(key)) for key, module in modules.items()]
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def test_checkpoints_are_small_hf_dirs_named_by_fingerprint(checkpoints, cache_dir):
    for name, directory in checkpoints.items():
        assert directory.parent == cache_dir / "models"
        assert directory.name == f"{name}-{tiny.builder_fingerprint(name)}"
        files = set(file_bytes(directory))
        weights = "checkpoints/latest-checkpoint.pt" if name.startswith("tiny_prismatic") else "model.safetensors"
        assert {"config.json", weights} <= files
        assert sum(len(content) for content in file_bytes(directory).values()) < MAX_CHECKPOINT_BYTES
    assert len({directory.name.rsplit("-", 1)[1] for directory in checkpoints.values()}) == len(TINY_MODELS)


def test_qwen2audio_audio_tokens_match_valid_encoder_frames(checkpoints):
    directory = checkpoints["tiny_qwen2audio"]
    processor = AutoProcessor.from_pretrained(directory)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(directory).eval()
    assert isinstance(processor, Qwen2AudioProcessor)
    assert processor.feature_extractor.feature_size == 80
    assert model.config.audio_config.max_source_positions == 500
    assert model.config.text_config.num_hidden_layers > LLM_HOOK_LAYER

    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio_url": "x"},
                {"type": "text", "text": "Describe this audio."},
            ],
        }
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    rng = np.random.default_rng(0)
    sampling_rate = processor.feature_extractor.sampling_rate
    waveforms = [
        0.1 * rng.standard_normal(int(seconds * sampling_rate)).astype(np.float32)
        for seconds in (1.5, 3.0)
    ]
    inputs = processor(
        text=[prompt, prompt],
        audio=waveforms,
        sampling_rate=sampling_rate,
        return_tensors="pt",
        padding=True,
    )
    assert inputs["input_features"].shape == (2, 80, 1000)

    audio_tokens = (inputs["input_ids"] == model.config.audio_token_id).sum(dim=1)
    _, valid_frames = model.model.audio_tower._get_feat_extract_output_lengths(
        inputs["feature_attention_mask"].sum(dim=1)
    )
    # 1.5 s -> 150 mel frames -> 75 after the stride-2 conv -> 37 after the pooler; 3 s -> 75.
    assert audio_tokens.tolist() == valid_frames.tolist() == [37, 75]
    assert inputs["attention_mask"][0, -1] == 0, "shorter prompt should be right-padded"

    output, captured = forward_capturing(model, inputs, {
        "encoder": model.model.audio_tower.layer_norm,
        "adapter": model.model.multi_modal_projector,
        "llm": model.model.language_model.layers[LLM_HOOK_LAYER],
        "final": model.model.language_model.norm,
    })

    sequence_length = inputs["input_ids"].shape[1]
    assert output.logits.shape == (2, sequence_length, model.config.text_config.vocab_size)
    assert captured["encoder"].shape == (2, 250, 32)
    assert captured["adapter"].shape == (2, 250, 32)
    assert captured["llm"].shape == captured["final"].shape == (2, sequence_length, 32)
    assert torch.isfinite(captured["final"]).all()
    audio_positions = inputs["input_ids"] == model.config.audio_token_id
    first_audio_state = captured["llm"][0][audio_positions[0]].mean(dim=0)
    second_audio_state = captured["llm"][1][audio_positions[1]].mean(dim=0)
    assert not torch.allclose(first_audio_state, second_audio_state)


def test_llava_expands_image_tokens_and_runs_on_two_images(checkpoints):
    directory = checkpoints["tiny_llava"]
    processor = AutoProcessor.from_pretrained(directory)
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    assert isinstance(processor, LlavaProcessor)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"

    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt == "USER: <image>\nDescribe this image. ASSISTANT:"

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)),
    ]
    texts = [prompt, "<image>\nDescribe this image."]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [16, 16] == [model.config.image_seq_length] * 2

    vision_layers = model.model.vision_tower.encoder.layers
    output, captured = forward_capturing(model, inputs, {
        "encoder": vision_layers[model.config.vision_feature_layer],
        "adapter": model.model.multi_modal_projector,
        "llm": model.model.language_model.layers[LLM_HOOK_LAYER],
        "final": model.model.language_model.norm,
    })

    sequence_length = inputs["input_ids"].shape[1]
    assert output.logits.shape == (2, sequence_length, model.config.text_config.vocab_size)
    assert captured["encoder"].shape == (2, 17, 32)  # CLS + 16 patches; the projector drops CLS
    assert captured["adapter"].shape == (2, 16, 32)
    assert captured["llm"].shape == captured["final"].shape == (2, sequence_length, 32)
    assert torch.isfinite(captured["final"]).all()


def test_llama_runs_on_two_texts_of_different_length(checkpoints):
    directory = checkpoints["tiny_llama"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert model.config.num_hidden_layers > LLM_HOOK_LAYER

    texts = ["A dog.", "A man is riding a bike down the street."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1].all()
    assert tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True) == texts[1]

    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    assert output.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1

    chat = [{"role": "user", "content": "Describe a dog."}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "USER: Describe a dog. ASSISTANT:"


def test_rebuild_writes_identical_files(checkpoints, tmp_path):
    """A second build (fresh tokenizer training, fresh init) reproduces every byte."""
    rng_state = torch.get_rng_state()
    for name, directory in checkpoints.items():
        rebuilt = ensure_tiny_checkpoint(name, tmp_path)
        assert rebuilt.name == directory.name
        assert file_bytes(rebuilt) == file_bytes(directory)
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not move the global RNG"


def test_second_call_is_a_no_op(checkpoints, cache_dir, monkeypatch):
    def must_not_build(_out_dir):
        raise AssertionError("builder ran although the checkpoint exists")

    for name, directory in checkpoints.items():
        monkeypatch.setitem(tiny.BUILDERS, name, must_not_build)
        modified = {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}
        assert ensure_tiny_checkpoint(name, cache_dir) == directory
        assert {path.name: path.stat().st_mtime_ns for path in directory.iterdir()} == modified


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []

    def slow_builder(out_dir: Path) -> None:
        calls.append(out_dir)
        threading.Event().wait(0.3)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setitem(tiny.BUILDERS, "tiny_llama", slow_builder)
    results: list[Path] = []

    def caller() -> None:
        results.append(ensure_tiny_checkpoint("tiny_llama", tmp_path))

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    leftovers = [path.name for path in (tmp_path / "models").iterdir() if path.is_dir()]
    assert leftovers == [results[0].name]


def test_failed_build_leaves_no_partial_directory(tmp_path, monkeypatch):
    def broken_builder(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(tiny.BUILDERS, "tiny_llava", broken_builder)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_checkpoint("tiny_llava", tmp_path)
    assert not [path for path in (tmp_path / "models").iterdir() if path.is_dir()]


def test_staging_left_by_a_killed_build_is_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setitem(tiny.BUILDERS, "tiny_llama", lambda out_dir: (out_dir / "x").write_text(""))
    target_name = f"tiny_llama-{tiny.builder_fingerprint('tiny_llama')}"
    leftover = tmp_path / "models" / f".tmp-killed-{target_name}"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"partial")

    assert ensure_tiny_checkpoint("tiny_llama", tmp_path).name == target_name
    assert not leftover.exists()


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiny_llava"):
        ensure_tiny_checkpoint("tiny_gpt", tmp_path)
