"""Twins of the families transformers ships: Qwen2-Audio, LLaVA-1.5 and a text-only Llama."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.models.twins.shapes import (
    AUDIO_CHUNK_SECONDS,
    AUDIO_D_MODEL,
    AUDIO_HOP_LENGTH,
    AUDIO_MAX_SOURCE_POSITIONS,
    AUDIO_NUM_MEL_BINS,
    IMAGE_NUM_PATCHES,
    IMAGE_PATCH_SIZE,
    IMAGE_SIZE,
    VISION_HIDDEN_SIZE,
    seeded_float32_model,
    tiny_text_config,
)
from mcollapse.models.twins.tokenization import (
    LLAMA_TOKENIZER,
    LLAVA_TOKENIZER,
    QWEN2AUDIO_CHAT_TEMPLATE,
    QWEN_TOKENIZER,
    VICUNA_CHAT_TEMPLATE,
    train_tokenizer,
)


def build_tiny_qwen2audio(out_dir: Path) -> None:
    """Qwen2-Audio twin: Whisper-style encoder (80 mel, 10 s window) + linear projector + Qwen2."""
    tokenizer = train_tokenizer(QWEN_TOKENIZER)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=AUDIO_NUM_MEL_BINS,
        sampling_rate=SAMPLE_RATE,
        hop_length=AUDIO_HOP_LENGTH,
        chunk_length=AUDIO_CHUNK_SECONDS,
        n_fft=400,
        padding_value=0.0,
        padding_side="right",
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=QWEN2AUDIO_CHAT_TEMPLATE,
    )
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=AUDIO_NUM_MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        d_model=AUDIO_D_MODEL,
        max_source_positions=AUDIO_MAX_SOURCE_POSITIONS,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=tiny_text_config(Qwen2Config, tokenizer),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = seeded_float32_model(Qwen2AudioForConditionalGeneration, config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_llava(out_dir: Path) -> None:
    """LLaVA-1.5 twin: CLIP ViT (32 px, patch 8, layer -2, CLS dropped) + 2-layer MLP + Llama."""
    tokenizer = train_tokenizer(LLAVA_TOKENIZER)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=IMAGE_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position, removed again by "default"
        chat_template=VICUNA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_PATCH_SIZE,
        projection_dim=VISION_HIDDEN_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_text_config(LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=IMAGE_NUM_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = seeded_float32_model(LlavaForConditionalGeneration, config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path) -> None:
    """Text-only Llama twin, the baseline decoder loaded through AutoModelForCausalLM."""
    tokenizer = train_tokenizer(LLAMA_TOKENIZER)
    tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    model = seeded_float32_model(LlamaForCausalLM, tiny_text_config(LlamaConfig, tokenizer))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
