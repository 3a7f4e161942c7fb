"""Ultravox twin in the published layout: config.json (model_type ultravox), model.safetensors, the LLM beside."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from transformers import LlamaConfig, WhisperConfig, WhisperFeatureExtractor

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.models.twins.shapes import (
    AUDIO_CHUNK_SECONDS,
    AUDIO_D_MODEL,
    AUDIO_HOP_LENGTH,
    AUDIO_MAX_SOURCE_POSITIONS,
    AUDIO_NUM_MEL_BINS,
    seeded_float32_model,
    tiny_text_config,
)
from mcollapse.models.twins.tokenization import LLAMA3_CHAT_TEMPLATE, LLAMA3_TOKENIZER, train_tokenizer
from mcollapse.models.ultravox import PREFIXES, UltravoxConfig, UltravoxModel


def build_tiny_ultravox(out_dir: Path) -> None:
    """Ultravox twin in the published layout: config.json (model_type ultravox) and
    model.safetensors with the encoder and projector; the LLM in the folder `text_model_id` names."""
    tokenizer = train_tokenizer(LLAMA3_TOKENIZER)
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    audio_config = WhisperConfig(
        num_mel_bins=AUDIO_NUM_MEL_BINS, d_model=AUDIO_D_MODEL, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64,
        max_source_positions=AUDIO_MAX_SOURCE_POSITIONS, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None,
    )
    text_config = tiny_text_config(LlamaConfig, tokenizer)
    config = UltravoxConfig(audio_config=audio_config, text_config=text_config, stack_factor=8, hidden_size=64,
                            projector_act="swiglu", projector_ln_mid=True, norm_init=0.4, text_model_id="text_model")
    model = seeded_float32_model(UltravoxModel, config)
    tower_and_projector = {k: v.contiguous() for k, v in model.state_dict().items()
                           if not k.startswith(PREFIXES["text"])}
    save_file(tower_and_projector, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    published = {"model_type": "ultravox", "architectures": ["UltravoxModel"], "audio_config": audio_config.to_dict(),
                 "text_model_id": "text_model", "stack_factor": 8, "hidden_size": 64, "projector_act": "swiglu",
                 "projector_ln_mid": True, "norm_init": 0.4, "ignore_index": -100}
    (out_dir / "config.json").write_text(json.dumps(published, indent=2))
    model.language_model.save_pretrained(out_dir / "text_model")
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(
        feature_size=AUDIO_NUM_MEL_BINS, sampling_rate=SAMPLE_RATE, hop_length=AUDIO_HOP_LENGTH,
        chunk_length=AUDIO_CHUNK_SECONDS, n_fft=400, padding_value=0.0, return_attention_mask=True,
    ).save_pretrained(out_dir)
