"""Prismatic twin: a run dir with random weights, a tiny ViT, gelu-mlp projector and Vicuna-shaped Llama.

Its backbone ids are added to the family's backbone tables here, so the family resolves a twin's
config.json like any published one without knowing about twins.
"""

from __future__ import annotations

from pathlib import Path

from mcollapse.models.prismatic import (
    LLM_BACKBONES,
    VISION_BACKBONES,
    LlmSpec,
    PrismaticSpec,
    PrismaticVLM,
    save_prismatic,
)
from mcollapse.models.twins.shapes import (
    IMAGE_PATCH_SIZE,
    IMAGE_SIZE,
    TEXT_HIDDEN_SIZE,
    TEXT_INTERMEDIATE_SIZE,
    TEXT_MAX_POSITIONS,
    TEXT_NUM_HEADS,
    TEXT_NUM_KV_HEADS,
    TEXT_NUM_LAYERS,
    TOKENIZER_VOCAB_SIZE,
    VISION_HIDDEN_SIZE,
    seeded_float32_model,
)
from mcollapse.models.twins.tokenization import TokenizerRoles, train_tokenizer
from mcollapse.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViTSpec

TINY_LLM_BACKBONE = "tiny-vicuna"


def tiny_backbones() -> tuple[dict[str, ViTSpec], dict[str, LlmSpec]]:
    """The twin's backbones, a DINOv2-style and a SigLIP-style ViT and a Vicuna-shaped LLM, from the shared
    tiny shapes."""
    common = dict(image_size=IMAGE_SIZE, patch_size=IMAGE_PATCH_SIZE, width=VISION_HIDDEN_SIZE, depth=3, heads=4)
    vision = {
        "tiny-dinov2-vit": ViTSpec(**common, layer_scale=True, reg_tokens=2, no_embed_class=True,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD),
        "tiny-siglip-vit": ViTSpec(**common, mlp_ratio=2.0, class_token=False, attention_pool=True),
    }
    llm = {TINY_LLM_BACKBONE: LlmSpec(TEXT_HIDDEN_SIZE, TEXT_INTERMEDIATE_SIZE, TEXT_NUM_LAYERS, TEXT_NUM_HEADS,
                                      TEXT_NUM_KV_HEADS, TOKENIZER_VOCAB_SIZE, max_positions=TEXT_MAX_POSITIONS)}
    return vision, llm


_tiny_vision, _tiny_llm = tiny_backbones()
VISION_BACKBONES.update(_tiny_vision)
LLM_BACKBONES.update(_tiny_llm)


def build_tiny_prismatic(out_dir: Path, vision_backbone_id: str = "tiny-dinov2-vit",
                         arch_specifier: str = "no-align+gelu-mlp", image_resize_strategy: str = "letterbox",
                         with_vision: bool = True) -> None:
    """A Prismatic run dir with random weights: tiny DINOv2-style ViT (32 px, patch 8, 2 registers), gelu-mlp
    projector, 18-layer Vicuna-shaped Llama; the Llama tokenizer's special tokens without a pad token (the loader
    adds `<PAD>`, as for Vicuna), saved beside the checkpoint because there is no hub repo to take it from."""
    roles = TokenizerRoles(special_tokens=("<unk>", "<s>", "</s>"), bos_token="<s>", eos_token="</s>",
                           pad_token=None, unk_token="<unk>", prepend_bos=True)
    train_tokenizer(roles).save_pretrained(out_dir)
    spec = PrismaticSpec.from_ids("tiny-prismatic", vision_backbone_id, TINY_LLM_BACKBONE, arch_specifier,
                                  image_resize_strategy)
    save_prismatic(seeded_float32_model(PrismaticVLM, spec), spec, out_dir, with_vision=with_vision)
