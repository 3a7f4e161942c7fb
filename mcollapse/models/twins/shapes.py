"""The shapes every twin shares: an 18-layer, 32-wide decoder, a 10 s audio window, 32 px images.

Small enough to build in seconds, with enough decoder layers for the default `llm_layer=16` hook.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from mcollapse.data.base import SAMPLE_RATE

WEIGHT_SEED = 1234
TOKENIZER_VOCAB_SIZE = 768

# Shared tiny decoder shape: 18 layers so that the default `llm_layer=16` hook resolves.
TEXT_HIDDEN_SIZE = 32
TEXT_INTERMEDIATE_SIZE = 64
TEXT_NUM_LAYERS = 18
TEXT_NUM_HEADS = 4
TEXT_NUM_KV_HEADS = 2
TEXT_MAX_POSITIONS = 2048

# Audio twin: Whisper-style front end (at SAMPLE_RATE) with a 10 s window instead of 30 s.
AUDIO_NUM_MEL_BINS = 80
AUDIO_CHUNK_SECONDS = 10
AUDIO_HOP_LENGTH = 160
AUDIO_MEL_FRAMES = AUDIO_CHUNK_SECONDS * SAMPLE_RATE // AUDIO_HOP_LENGTH
AUDIO_MAX_SOURCE_POSITIONS = AUDIO_MEL_FRAMES // 2  # conv2 has stride 2
AUDIO_D_MODEL = 32

# Vision twin: 32 px images cut into 8 px patches -> 16 patch tokens (+1 CLS).
IMAGE_SIZE = 32
IMAGE_PATCH_SIZE = 8
IMAGE_NUM_PATCHES = (IMAGE_SIZE // IMAGE_PATCH_SIZE) ** 2
VISION_HIDDEN_SIZE = 32


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """bos/eos/pad ids for the text config, so generation and padding agree with the tokenizer."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_text_config(config_class: type, tokenizer: PreTrainedTokenizerFast):
    """The shared 18-layer, 32-wide decoder, sized to the tokenizer's vocabulary."""
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_NUM_LAYERS,
        num_attention_heads=TEXT_NUM_HEADS,
        num_key_value_heads=TEXT_NUM_KV_HEADS,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        tie_word_embeddings=False,
        **special_token_ids(tokenizer),
    )


def seeded_float32_model(model_class: type, config) -> torch.nn.Module:
    """Random-init a model from a fixed seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model = model_class(config)
    return model.to(torch.float32).eval()
