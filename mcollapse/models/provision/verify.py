"""A built smol_speech or smol_vision checkpoint reloaded the way users load it, and one modal+text forward run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.models.provision.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN


@torch.no_grad()
def verify_checkpoint(checkpoint: Path, window_seconds: int) -> dict:
    """Reload the written checkpoint the way users will, and run one audio+text forward.

    Checks that `<|AUDIO|>` expands to the encoder's output count and reports how the projected
    audio features compare in RMS with the text token embeddings.
    """
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    clip_seconds = min(3, window_seconds)
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.standard_normal(clip_seconds * SAMPLE_RATE)).astype(np.float32)
    conversation = [{"role": "user", "content": [
        {"type": "audio", "audio_url": "clip.wav"},
        {"type": "text", "text": "Describe this audio."},
    ]}]  # fmt: skip
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[prompt], audio=[waveform], sampling_rate=SAMPLE_RATE, return_tensors="pt",
        padding=True,
    )  # fmt: skip
    frames = clip_seconds * 100
    expected_audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    audio_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    if audio_tokens != expected_audio_tokens:
        raise ValueError(
            f"{AUDIO_TOKEN} expanded to {audio_tokens} tokens, expected {expected_audio_tokens}"
        )
    if inputs["input_features"].shape[-1] != window_seconds * 100:
        raise ValueError(f"mel features are not padded to {window_seconds} s")
    outputs = model(**inputs)
    if not torch.isfinite(outputs.logits).all():
        raise ValueError("smol_speech forward produced non-finite logits")

    audio_features = model.model.audio_tower(inputs["input_features"]).last_hidden_state
    projected = model.model.multi_modal_projector(audio_features[0, :audio_tokens])
    token_embeddings = model.get_input_embeddings().weight
    return {
        "check_audio_tokens_for_%ds_clip" % clip_seconds: audio_tokens,
        "check_projected_audio_rms": float(projected.pow(2).mean().sqrt()),
        "check_text_embedding_rms": float(token_embeddings.pow(2).mean().sqrt()),
    }


@torch.no_grad()
def verify_vision_checkpoint(checkpoint: Path, expected_image_tokens: int) -> dict:
    """Reload the written LLaVA checkpoint the way users will, and run one image+text forward.

    Checks that `<image>` expands to the tower's output count and reports how the projected
    image features compare in RMS with the text token embeddings.
    """
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mcollapse.models.vision  # noqa: F401  (registers the tower with transformers)

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 160, dtype=np.float32)
    pixels = np.stack([gradient[None, :].repeat(120, 0), gradient[:120, None].repeat(160, 1),
                       rng.uniform(0, 255, (120, 160))], axis=-1)  # fmt: skip
    image = Image.fromarray(pixels.astype(np.uint8))
    conversation = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."},
    ]}]  # fmt: skip
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt", padding=True)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if image_tokens != expected_image_tokens:
        raise ValueError(f"{IMAGE_TOKEN} expanded to {image_tokens} tokens, expected {expected_image_tokens}")
    outputs = model(**inputs)
    if not torch.isfinite(outputs.logits).all():
        raise ValueError("smol_vision forward produced non-finite logits")

    features = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
    projected = model.model.multi_modal_projector(features[0])
    token_embeddings = model.get_input_embeddings().weight
    return {
        "check_image_tokens": image_tokens,
        "check_pixel_values_shape": list(inputs["pixel_values"].shape),
        "check_head_feature_rms": float(features.pow(2).mean().sqrt()),
        "check_projected_image_rms": float(projected.pow(2).mean().sqrt()),
        "check_text_embedding_rms": float(token_embeddings.pow(2).mean().sqrt()),
    }
