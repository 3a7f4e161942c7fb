"""Twins of Gemma-2 (text-only) and of its multimodal descendant PaliGemma-2.

The two share the tokenizer and the decoder's shape, so text gives identical token ids in both and
their hidden states live in spaces of the same width, as for Gemma-2-2B and PaliGemma-2-3B. The
descendant's language model starts from the base twin's weights (its first `len(tokenizer)` rows of
the embedding) plus a seeded Gaussian perturbation of relative size `DESCENDANT_PERTURBATION` on
every LLM tensor: a small, known representation shift, never exactly zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from mcollapse.models.twins.shapes import (
    IMAGE_NUM_PATCHES,
    IMAGE_PATCH_SIZE,
    IMAGE_SIZE,
    TEXT_HIDDEN_SIZE,
    VISION_HIDDEN_SIZE,
    WEIGHT_SEED,
    seeded_float32_model,
    tiny_text_config,
)
from mcollapse.models.twins.tokenization import GEMMA_TOKENIZER, train_tokenizer

DESCENDANT_PERTURBATION = 0.05  # std of the added noise, relative to each tensor's own RMS
DESCENDANT_SEED = WEIGHT_SEED + 1


def tiny_gemma2() -> tuple:
    """The base twin: the trained tokenizer and a seeded tiny Gemma-2 (tied embeddings, as Gemma-2)."""
    tokenizer = train_tokenizer(GEMMA_TOKENIZER)
    config = tiny_text_config(Gemma2Config, tokenizer)
    config.head_dim = TEXT_HIDDEN_SIZE // config.num_attention_heads
    config.query_pre_attn_scalar = config.head_dim
    config.sliding_window = 8  # small enough that the alternating sliding layers matter on short texts
    config.tie_word_embeddings = True
    return tokenizer, seeded_float32_model(Gemma2ForCausalLM, config)


def build_tiny_gemma2(out_dir: Path) -> None:
    """Text-only Gemma-2 twin, loaded through AutoModelForCausalLM (the causal_lm family)."""
    tokenizer, model = tiny_gemma2()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _perturbed_from(base: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy the base decoder into `target` (a Gemma2Model, maybe with a larger vocabulary), then add
    seeded noise of relative size DESCENDANT_PERTURBATION to every tensor."""
    generator = torch.Generator().manual_seed(DESCENDANT_SEED)
    source = base.state_dict()
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            if name not in source:
                continue
            value = source[name]
            if value.shape != tensor.shape:  # the embedding: the descendant's vocabulary extends the base's
                tensor[: value.shape[0]] = value
            else:
                tensor.copy_(value)
            if not tensor.is_floating_point():
                continue
            scale = tensor.pow(2).mean().sqrt().clamp_min(1e-3) * DESCENDANT_PERTURBATION
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def build_tiny_paligemma2(out_dir: Path) -> None:
    """PaliGemma-2 twin: SigLIP (32 px, patch 8, no head) -> linear projector -> the perturbed Gemma-2 twin.

    The processor adds <image> and the <locNNNN>/<segNNN> tokens after the base vocabulary, as
    PaliGemma's tokenizer does, so every text id is the base twin's."""
    _, base = tiny_gemma2()
    tokenizer = train_tokenizer(GEMMA_TOKENIZER)
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = IMAGE_NUM_PATCHES
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = Gemma2Config.from_dict(base.config.to_dict())
    text_config.vocab_size = len(processor.tokenizer)
    vision_config = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_PATCH_SIZE,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        vocab_size=text_config.vocab_size,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_size=TEXT_HIDDEN_SIZE,
    )
    model = seeded_float32_model(PaliGemmaForConditionalGeneration, config)
    _perturbed_from(base.model, model.model.language_model)
    model.tie_weights()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
