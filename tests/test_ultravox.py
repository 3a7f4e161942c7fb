"""Ultravox implemented on transformers classes: the published layout loads by key name, the
projector and the audio-position expansion match the architecture description, batches equal
single clips, and what cannot be loaded or encoded whole says so."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mcollapse.data.base import Record, Sample
from mcollapse.errors import UserError
from mcollapse.extraction.extract import readable_samples
from mcollapse.extraction.hooks import capture
from mcollapse.models import load_model
from mcollapse.models.lora import attach
from mcollapse.models.roles import HookTarget
from mcollapse.models.twins import ensure_tiny_checkpoint
from mcollapse.models.ultravox import PREFIXES, UltravoxConfig, UltravoxModel
from tests.helpers import audio_samples, model_cfg


@pytest.fixture(scope="module")
def twin(cache_dir):
    return load_model(model_cfg("tiny_ultravox"), cache_dir, "cpu")


def test_twin_is_written_in_the_published_layout(cache_dir):
    folder = ensure_tiny_checkpoint("tiny_ultravox", cache_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ultravox" and config["text_model_id"] == "text_model"
    primary = load_file(str(folder / "model.safetensors"))
    assert {k.split(".")[0] for k in primary} == {"audio_tower", "multi_modal_projector"}
    assert {"multi_modal_projector.ln_pre.weight", "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.ln_mid.weight", "multi_modal_projector.linear_2.weight"} <= set(primary)
    assert "audio_tower.layer_norm.weight" in primary and "audio_tower.conv1.weight" in primary
    llm = load_file(str(folder / "text_model" / "model.safetensors"))
    assert "lm_head.weight" in llm and "model.layers.0.self_attn.q_proj.weight" in llm


def _manual_projector(projector, features: torch.Tensor) -> torch.Tensor:
    """The projector as the architecture describes it, written out step by step."""
    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    frames, width = features.shape
    groups = math.ceil(frames / 8)
    stacked = torch.zeros(groups * 8, width)
    stacked[:frames] = features
    stacked = stacked.reshape(groups, 8 * width)  # frames 0..7 side by side, then 8..15, ...
    hidden = rms(stacked, projector.ln_pre.weight) @ projector.linear_1.weight.T
    value, gate = hidden.chunk(2, dim=-1)
    hidden = rms(F.silu(gate) * value, projector.ln_mid.weight)
    return hidden @ projector.linear_2.weight.T


def test_projector_matches_the_architecture_description(twin):
    projector = twin.model.multi_modal_projector
    features = torch.randn(2, 21, twin.model.config.audio_config.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = projector(features)
        for b in range(2):
            torch.testing.assert_close(ours[b], _manual_projector(projector, features[b]), rtol=1e-5, atol=1e-5)
    assert ours.shape[1] == 3 and isinstance(projector.ln_post, torch.nn.Identity)  # ln_mid variant (v0.5+)


def test_audio_positions_follow_the_prompt_prefix_one_per_16_mel_frames(twin):
    samples = audio_samples([1.0, 2.5, 0.3])
    batch = twin.prepare(samples)
    mel = batch.inputs["audio_lens"]
    assert mel.tolist() == [100, 250, 30]  # 10 ms hop
    assert batch.frame_lengths.tolist() == [math.ceil(m / 16) for m in mel.tolist()]
    assert batch.encoder_frame_lengths.tolist() == [math.ceil(m / 2) for m in mel.tolist()]
    pre, post = twin.prompt_token_parts()
    for b, n in enumerate(batch.frame_lengths.tolist()):
        row = batch.inputs["input_ids"][b, : int(batch.token_mask[b].sum())].tolist()
        assert row == pre + [twin.tokenizer.eos_token_id] * n + post
        positions = batch.modal_token_mask[b].nonzero()[:, 0].tolist()
        assert positions == list(range(len(pre), len(pre) + n))
    # the LLM's first layer receives the projector output at exactly those positions
    first_layer = HookTarget("llm_layer", "layer0", "language_model.model.layers.0", "input")
    with torch.no_grad():
        audio, tokens = twin.model.audio_embeddings(batch.inputs["audio_values"], batch.inputs["audio_lens"])
        seen = capture(twin.model, [first_layer], lambda: twin.model(**batch.inputs, use_cache=False))["layer0"]
    for b, n in enumerate(tokens.tolist()):
        torch.testing.assert_close(seen[b][batch.modal_token_mask[b]], audio[b, :n])


def test_a_batch_gives_each_clip_what_it_gets_alone(twin):
    samples = audio_samples([0.7, 2.9, 1.6, 2.2])
    batch = twin.prepare(samples)
    with torch.no_grad():
        logits = twin.model(**batch.inputs, use_cache=False).logits
        for b, sample in enumerate(samples):
            alone = twin.prepare([sample])
            single = twin.model(**alone.inputs, use_cache=False).logits[0]
            n = int(batch.token_mask[b].sum())
            torch.testing.assert_close(logits[b, :n], single, rtol=1e-4, atol=1e-4)


def _copy(cache_dir, tmp_path):
    target = tmp_path / "ultravox"
    shutil.copytree(ensure_tiny_checkpoint("tiny_ultravox", cache_dir), target)
    return target


def test_missing_and_unexpected_keys_are_listed(cache_dir, tmp_path):
    folder = _copy(cache_dir, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights.pop("multi_modal_projector.ln_mid.weight")
    weights["multi_modal_projector.extra.weight"] = torch.zeros(2)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"1 missing keys \['multi_modal_projector.ln_mid.weight'\], "
                                        r"1 unexpected keys \['multi_modal_projector.extra.weight'\]"):
        load_model(model_cfg("tiny_ultravox", build=None, local_path=str(folder)), cache_dir, "cpu")


def test_a_checkpoint_of_another_family_is_named(cache_dir):
    qwen = ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    with pytest.raises(UserError, match="model_type is 'qwen2_audio', expected 'ultravox'"):
        load_model(model_cfg("tiny_ultravox", build=None, local_path=str(qwen)), cache_dir, "cpu")


def test_the_encoder_can_come_from_the_whisper_model_the_config_names(cache_dir, tmp_path, twin):
    """Checkpoints without encoder weights read them from `audio_model_id` (Whisper key names)."""
    from transformers import WhisperForConditionalGeneration

    folder = _copy(cache_dir, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    tower = {k[len(PREFIXES["audio"]):]: v for k, v in weights.items() if k.startswith(PREFIXES["audio"])}
    save_file({k: v for k, v in weights.items() if not k.startswith(PREFIXES["audio"])},
              str(folder / "model.safetensors"))
    whisper = WhisperForConditionalGeneration(twin.model.config.audio_config)
    missing, _ = whisper.model.encoder.load_state_dict(tower, strict=False)
    assert not missing
    whisper.save_pretrained(folder / "whisper")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "audio_model_id": "whisper"}))
    loaded = load_model(model_cfg("tiny_ultravox", build=None, local_path=str(folder)), cache_dir, "cpu")
    batch = twin.prepare(audio_samples([1.3]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch.inputs).logits, twin.model(**batch.inputs).logits)


def test_clips_longer_than_the_window_are_skipped_and_counted(twin, tmp_path):
    import soundfile

    paths = []
    for name, seconds in (("short", 2.0), ("long", 10.5)):
        path = tmp_path / f"{name}.wav"
        soundfile.write(path, np.zeros(int(16_000 * seconds), dtype=np.float32) + 0.01, 16_000)
        paths.append(Record(id=name, path=path, modality="audio"))
    skipped = {}
    kept = readable_samples(paths, False, skipped.__setitem__, twin.sample_problem)
    assert [s.id for s in kept] == ["short"] and "10 s window" in skipped["long"]
    with pytest.raises(UserError, match="long"):
        readable_samples(paths, True, skipped.__setitem__, twin.sample_problem)
    with pytest.raises(ValueError, match="window"):
        twin.prepare([Sample(paths[1], audio=np.zeros(16_000 * 11, dtype=np.float32))])


def test_lora_touches_only_the_llm(cache_dir):
    family = load_model(model_cfg("tiny_ultravox"), cache_dir, "cpu")
    assert any(n.startswith("audio_tower.") and n.endswith("q_proj") for n, _ in family.model.named_modules())
    peft_model = attach(family.model, _lora_settings())
    trainable = [n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("language_model.model.layers.") for n in trainable)


def _lora_settings():
    from omegaconf import OmegaConf

    from mcollapse.config import LoraSettings

    return OmegaConf.structured(LoraSettings)


def test_full_size_key_names_match_the_published_layout():
    """The 8B model's parameter names, built on the meta device, against the published ones: Whisper
    encoder keys under audio_tower., the four projector weights, Llama keys under language_model."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    whisper = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                            encoder_ffn_dim=5120, decoder_layers=4, decoder_attention_heads=20,
                            decoder_ffn_dim=5120, max_source_positions=1500, vocab_size=51866)
    llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    config = UltravoxConfig(audio_config=whisper, text_config=llama, stack_factor=8, hidden_size=8192,
                            projector_act="swiglu", projector_ln_mid=True)
    with init_empty_weights():
        ours = UltravoxModel(config)
        published_whisper = WhisperForConditionalGeneration(whisper)
        published_llama = LlamaForCausalLM(llama)
    published = {"audio_tower." + k.removeprefix("model.encoder.") for k in published_whisper.state_dict()
                 if k.startswith("model.encoder.")}
    published |= {"language_model." + k for k in published_llama.state_dict()}
    published |= {f"multi_modal_projector.{n}.weight" for n in ("ln_pre", "linear_1", "ln_mid", "linear_2")}
    assert set(ours.state_dict()) == published
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k.startswith("multi_modal_projector")}
    assert shapes == {"multi_modal_projector.ln_pre.weight": (10240,),
                      "multi_modal_projector.linear_1.weight": (8192, 10240),
                      "multi_modal_projector.ln_mid.weight": (4096,),
                      "multi_modal_projector.linear_2.weight": (4096, 4096)}
