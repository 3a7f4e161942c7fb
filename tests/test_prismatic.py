"""The native Prismatic loader on its offline twin: the real run-dir format both ways, the published key names at
full size, hooks, the projector and ViT read-out by hand, patches right after BOS with the answer scored where
Prismatic scores it, greedy decoding, LoRA on the LLM only, and one-line errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from omegaconf import OmegaConf
from PIL import Image

from mcollapse.config import LoraSettings
from mcollapse.errors import UserError
from mcollapse.extraction.hooks import capture
from mcollapse.models import load_model
from mcollapse.models.base import ROLES
from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.models.lora import attach, llm_path
from mcollapse.models.prismatic import (
    CHECKPOINT,
    ImageTransform,
    PrismaticSpec,
    PrismaticVLM,
    expected_shapes,
)
from mcollapse.models.roles import resolve_hooks
from mcollapse.models.twins.prismatic import build_tiny_prismatic
from tests.helpers import image_samples, model_cfg

LLM_LAYER = 16


@pytest.fixture(scope="module")
def family(cache_dir):
    return load_model(model_cfg("tiny_prismatic"), cache_dir, "cpu")


@pytest.fixture(scope="module")
def samples():
    return image_samples(3)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)["model"]


def _variant(tmp_path: Path, cache_dir: Path, **options):
    """A twin with another backbone/projector, written to `tmp_path` and loaded through model.local_path."""
    build_tiny_prismatic(tmp_path, **options)
    return load_model(model_cfg("tiny_prismatic", build=None, local_path=str(tmp_path)), cache_dir, "cpu")


def _targets(family):
    targets = resolve_hooks(family.model, ROLES, LLM_LAYER, adapter_names=family.adapter_module_names())
    return {t.name: t for t in targets}


def _captured(family, samples):
    batch = family.prepare(samples)
    targets = list(_targets(family).values())
    return batch, capture(family.model, targets, lambda: family.model(**batch.inputs, use_cache=False))


def test_twin_is_written_in_the_real_run_dir_format_and_reloads_to_the_same_weights(family):
    run_dir = Path(family.checkpoint)
    config = json.loads((run_dir / "config.json").read_text())["model"]
    assert config == {"model_id": "tiny-prismatic", "arch_specifier": "no-align+gelu-mlp",
                      "vision_backbone_id": "tiny-dinov2-vit", "llm_backbone_id": "tiny-vicuna",
                      "image_resize_strategy": "letterbox"}
    components = _checkpoint(run_dir)
    assert set(components) == {"vision_backbone", "projector", "llm_backbone"}
    assert set(components["projector"]) == {"projector.0.weight", "projector.0.bias", "projector.2.weight",
                                            "projector.2.bias"}
    llm = set(components["llm_backbone"])
    assert {"llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight",
            "llm.model.layers.17.self_attn.q_proj.weight", "llm.model.layers.17.mlp.gate_proj.weight"} <= llm
    assert all(k.startswith(("llm.model.", "llm.lm_head.")) for k in llm)
    vision = set(components["vision_backbone"])
    assert {"featurizer.cls_token", "featurizer.reg_token", "featurizer.pos_embed",
            "featurizer.patch_embed.proj.weight", "featurizer.blocks.2.attn.qkv.weight",
            "featurizer.blocks.0.ls1.gamma", "featurizer.norm.weight"} <= vision
    loaded = family.model.state_dict()
    for component, weights in components.items():
        for key, tensor in weights.items():
            assert torch.equal(loaded[f"{component}.{key}"], tensor), key
    # the tokenizer is saved as Vicuna's is (no pad token); the loader adds <PAD> right after the vocabulary
    assert json.loads((run_dir / "tokenizer_config.json").read_text()).get("pad_token") is None
    tokenizer = family.tokenizer
    assert tokenizer.pad_token == "<PAD>" and tokenizer.pad_token_id == len(tokenizer) - 1
    assert family.placeholder_id == len(tokenizer) < family.model.get_input_embeddings().num_embeddings


def test_rebuilding_the_twin_writes_identical_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        build_tiny_prismatic(tmp_path / name)
    for path in (Path("config.json"), CHECKPOINT, Path("tokenizer.json")):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


def _published_keys(vision: dict, llm_layers: int, projector: list[int]) -> set[str]:
    """Checkpoint keys of a Prismatic 7B VLM, written out from the published modules: timm's VisionTransformer
    (num_classes=0) as `vision_backbone.featurizer`, nn.Sequential MLP projectors as `projector.projector`, and
    transformers' LlamaForCausalLM as `llm_backbone.llm`."""
    vit = {"pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"}
    vit |= {"cls_token"} if vision["class_token"] else set()
    vit |= {"reg_token"} if vision["registers"] else set()
    vit |= {"patch_embed.proj.bias"} if not vision["pre_norm"] else {"norm_pre.weight", "norm_pre.bias"}
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")] + (["ls1.gamma", "ls2.gamma"] if vision["layer_scale"] else [])
    vit |= {f"blocks.{i}.{k}" for i in range(vision["depth"]) for k in block}
    if vision["attention_pool"]:
        vit |= {"attn_pool.latent"} | {f"attn_pool.{m}.{p}" for m in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")
                                        for p in ("weight", "bias")}
    layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    llm = {"llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight"}
    llm |= {f"llm.model.layers.{i}.{k}" for i in range(llm_layers) for k in layer}
    return ({f"vision_backbone.featurizer.{k}" for k in vit} | {f"llm_backbone.{k}" for k in llm}
            | {f"projector.projector.{i}.{p}" for i in projector for p in ("weight", "bias")})


@pytest.mark.parametrize("model_id,vision_id,vision,patch_width", [
    ("dinov2-224px+7b", "dinov2-vit-l",
     dict(depth=24, class_token=True, registers=True, pre_norm=False, layer_scale=True, attention_pool=False), 1024),
    ("siglip-224px+7b", "siglip-vit-so400m",
     dict(depth=27, class_token=False, registers=False, pre_norm=False, layer_scale=False, attention_pool=True), 1152),
])
def test_full_size_keys_are_the_published_checkpoints(model_id, vision_id, vision, patch_width):
    """The 7B models on the meta device: every key the released checkpoints (and timm's weights) carry, and the
    shapes of the LLM and projector that Vicuna-7B with Prismatic's <PAD> row (32001 -> 32064 rows) has."""
    spec = PrismaticSpec.from_ids(model_id, vision_id, "vicuna-v15-7b", "no-align+gelu-mlp", "letterbox")
    with init_empty_weights():
        model = PrismaticVLM(spec)
    shapes = {f"{c}.{k}": s for c, keys in expected_shapes(model).items() for k, s in keys.items()}
    assert set(shapes) == _published_keys(vision, 32, [0, 2])
    assert shapes["llm_backbone.llm.model.embed_tokens.weight"] == shapes["llm_backbone.llm.lm_head.weight"] \
        == (32064, 4096)
    assert shapes["llm_backbone.llm.model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert shapes["projector.projector.0.weight"] == (4096, patch_width)
    assert shapes["projector.projector.2.weight"] == (4096, 4096)
    assert shapes["vision_backbone.featurizer.pos_embed"] == (1, 256, patch_width)  # 16 x 16 patches at 224 px
    assert model.n_patches == 256 and model.image_token_id == 32001


def test_hooks_resolve_to_projector_input_and_output_and_the_llm(family, samples):
    targets = _targets(family)
    assert {n: (t.path, t.capture) for n, t in targets.items()} == {
        "encoder_output": ("projector", "input"),
        "adapter_output": ("projector", "output"),
        f"llm_layer_{LLM_LAYER}": (f"llm_backbone.llm.model.layers.{LLM_LAYER}", "output"),
        "llm_final": ("llm_backbone.llm.model.norm", "output"),
    }
    batch, hidden = _captured(family, samples)
    length = batch.inputs["input_ids"].shape[1]
    assert hidden["encoder_output"].shape == (3, 16, 32) and hidden["adapter_output"].shape == (3, 16, 32)
    assert hidden[f"llm_layer_{LLM_LAYER}"].shape == hidden["llm_final"].shape == (3, length, 32)


@pytest.mark.parametrize("arch", ["no-align+gelu-mlp", "linear", "fused-gelu-mlp"])
def test_projector_output_is_the_published_mlp_by_hand(tmp_path, cache_dir, samples, arch):
    family = _variant(tmp_path, cache_dir, vision_backbone_id="tiny-siglip-vit", arch_specifier=arch)
    _, hidden = _captured(family, samples)
    x, weights = hidden["encoder_output"], _checkpoint(tmp_path)["projector"]

    def linear(h, i):
        return F.linear(h, weights[f"projector.{i}.weight"], weights[f"projector.{i}.bias"])

    if arch == "linear":
        assert set(weights) == {"projector.weight", "projector.bias"}
        expected = F.linear(x, weights["projector.weight"], weights["projector.bias"])
    elif arch == "fused-gelu-mlp":  # fc1 (4x vision width) -> GELU -> fc2 -> GELU -> fc3
        assert weights["projector.0.weight"].shape == (4 * 32, 32)
        expected = linear(F.gelu(linear(F.gelu(linear(x, 0)), 2)), 4)
    else:  # fc1 -> GELU -> fc2
        expected = linear(F.gelu(linear(x, 0)), 2)
    torch.testing.assert_close(hidden["adapter_output"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backbone,prefix", [("tiny-dinov2-vit", 3), ("tiny-siglip-vit", 0)])
def test_features_are_the_second_to_last_blocks_patch_tokens(tmp_path, cache_dir, samples, backbone, prefix):
    """As Prismatic reads them: after block depth-2, class/register tokens dropped, no final norm."""
    family = _variant(tmp_path, cache_dir, vision_backbone_id=backbone)
    vit = family.model.vision_backbone["featurizer"]
    pixels = family.prepare(samples).inputs["pixel_values"]
    with torch.no_grad():
        features = vit(pixels)
        tokens = vit.norm_pre(vit._tokens(pixels))
        assert tokens.shape[1] == 16 + prefix
        by_hand = vit.blocks[1](vit.blocks[0](tokens))[:, prefix:]
        torch.testing.assert_close(features, by_hand, rtol=0, atol=0)
        for unused in (vit.blocks[-1], vit.norm):
            for p in unused.parameters():
                p.add_(1.0)
        assert torch.equal(vit(pixels), features)
        vit.blocks[-2].mlp.fc2.bias.add_(1.0)
        assert not torch.equal(vit(pixels), features)


def test_patches_sit_right_after_bos_as_prismatic_builds_the_sequence(family, samples):
    """Our rows = [BOS, placeholders, prompt]; the LLM sees exactly Prismatic's cat([BOS, patches, prompt])."""
    batch = family.prepare(samples)
    ids = batch.inputs["input_ids"]
    tokenizer, n = family.tokenizer, family.model.n_patches
    prompt = tokenizer(family.render_prompt().removeprefix(family.placeholder)).input_ids  # with BOS, as Prismatic
    assert prompt[0] == tokenizer.bos_token_id
    for row in ids.tolist():
        assert row == prompt[:1] + [family.placeholder_id] * n + prompt[1:]
    assert batch.modal_token_mask[:, 1 : 1 + n].all() and int(batch.modal_token_mask.sum()) == 3 * n
    model = family.model
    with torch.no_grad():
        patches = model.projector(model.vision_backbone["featurizer"](batch.inputs["pixel_values"]))
        text = model.get_input_embeddings()(torch.tensor([prompt] * 3))
        prismatic = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        expected = model.llm(inputs_embeds=prismatic).logits
        torch.testing.assert_close(model(**batch.inputs).logits, expected, rtol=0, atol=0)
    assert "Describe this image." in family.render_prompt() and family.render_prompt().endswith(" ASSISTANT:")
    assert family.render_prompt(user="<image>\nWhat is it?", system="").endswith("<image>USER: What is it? ASSISTANT:")


def _adapter_sequences(family, samples):
    target = _targets(family)["adapter_output"]
    batch = family.prepare(samples)
    hidden = capture(family.model, [target], lambda: family.model(**batch.inputs))[target.name]
    return [hidden[i].clone() for i in range(len(samples))]


def _full_model_answer_logprob(family, sample, answer) -> float:
    inputs = dict(family.prepare([sample]).inputs)
    prompt_len = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(family.model(**inputs).logits[0].float(), dim=-1)
    return float(sum(logp[prompt_len - 1 + k, tok] for k, tok in enumerate(answer)))


def test_decoder_content_scores_equal_the_full_models(family, samples):
    zs = _adapter_sequences(family, samples)
    answers = [family.answer_token_ids(s.record.text) for s in samples]
    assert all(a[-1] == family.tokenizer.eos_token_id for a in answers)
    batch = compose(family, [len(z) for z in zs], answers, "content", "sum")
    assert torch.equal(batch.input_ids[:, : zs[0].shape[0] + 1], family.prepare(samples).inputs["input_ids"][
        :, : zs[0].shape[0] + 1])
    ours = Decoder(family).scores(batch, pad_sequences(zs)).detach()
    for i, sample in enumerate(samples):
        assert ours[i].item() == pytest.approx(_full_model_answer_logprob(family, sample, answers[i]), rel=1e-5)


def test_batched_greedy_decoding_equals_a_manual_loop_on_the_full_model(family, samples):
    zs = _adapter_sequences(family, samples)
    ours = Decoder(family).greedy(zs, family.prompt_token_parts(), max_new_tokens=6)
    eos = family.tokenizer.eos_token_id
    for i, sample in enumerate(samples):
        inputs = family.prepare([sample]).inputs
        ids, expected = inputs["input_ids"], []
        with torch.no_grad():
            for _ in range(6):
                token = int(family.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         pixel_values=inputs["pixel_values"]).logits[0, -1].argmax())
                if token == eos:
                    break
                expected.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert ours[i] == expected


def test_lora_trains_the_llm_only_never_the_vit(cache_dir):
    family = load_model(model_cfg("tiny_prismatic"), cache_dir, "cpu")
    vit_linears = [n for n, _ in family.model.named_modules() if n.startswith("vision_backbone.") and
                   n.endswith(("attn.qkv", "attn.proj", "attn_pool.q", "attn_pool.kv"))]
    assert vit_linears, "the ViT has attention linears a loose LoRA target could hit"
    peft_model = attach(family.model, OmegaConf.structured(LoraSettings))
    trainable = [n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad]
    assert llm_path(family.model) == "llm_backbone.llm.model"
    assert trainable and all(n.startswith("llm_backbone.llm.model.layers.") and ".lora_" in n for n in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not [n for n, _ in peft_model.named_modules() if "vision_backbone" in n and "lora" in n]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _copy_run(family, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(family.checkpoint, run)
    return run


def _load_dir(path: Path, cache_dir: Path):
    return load_model(model_cfg("tiny_prismatic", build=None, local_path=str(path)), cache_dir, "cpu")


def test_checkpoints_of_another_family_or_version_fail_in_one_line(family, tmp_path, cache_dir):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
    with pytest.raises(UserError) as err:
        _load_dir(llava, cache_dir)
    assert "not a Prismatic run dir" in _one_line(err) and "model_type 'llava'" in str(err.value)

    run = _copy_run(family, tmp_path)
    original = json.loads((run / "config.json").read_text())
    for field, value, expected in (("vision_backbone_id", "dinosiglip-vit-so-384px", "dinov2-vit-l"),
                                   ("arch_specifier", "no-align+mlp-3x", "gelu-mlp"),
                                   ("llm_backbone_id", "mistral-v0.1-7b-pure", "vicuna-v15-7b"),
                                   ("image_resize_strategy", "corner-pad", "letterbox")):
        changed = json.loads(json.dumps(original))
        changed["model"][field] = value
        (run / "config.json").write_text(json.dumps(changed))
        with pytest.raises(UserError) as err:
            _load_dir(run, cache_dir)
        assert value in _one_line(err) and expected in str(err.value)
    (run / "config.json").write_text(json.dumps(original))
    (run / CHECKPOINT).unlink()
    with pytest.raises(UserError) as err:
        _load_dir(run, cache_dir)
    assert "does not exist" in _one_line(err)
    torch.save({"state_dict": {}}, run / CHECKPOINT)
    with pytest.raises(UserError) as err:
        _load_dir(run, cache_dir)
    assert "not a Prismatic checkpoint" in _one_line(err)


def test_missing_unexpected_and_misshaped_keys_are_listed(family, tmp_path, cache_dir):
    run = _copy_run(family, tmp_path)
    components = _checkpoint(run)
    del components["llm_backbone"]["llm.model.layers.3.mlp.up_proj.weight"]
    components["projector"]["projector.4.weight"] = torch.zeros(1)
    components["vision_backbone"]["featurizer.pos_embed"] = torch.zeros(1, 5, 32)
    torch.save({"model": components}, run / CHECKPOINT)
    with pytest.raises(UserError) as err:
        _load_dir(run, cache_dir)
    message = _one_line(err)
    assert "missing llm_backbone keys: llm.model.layers.3.mlp.up_proj.weight" in message
    assert "unexpected projector keys: projector.4.weight" in message
    assert "featurizer.pos_embed (1, 5, 32) != (1, 16, 32)" in message


def test_a_checkpoint_without_the_vision_backbone_needs_pretrained_weights(tmp_path, cache_dir):
    with pytest.raises(UserError) as err:
        _variant(tmp_path, cache_dir, with_vision=False)
    assert "no vision_backbone weights" in _one_line(err) and "tiny-dinov2-vit" in str(err.value)
    assert set(_checkpoint(tmp_path)) == {"projector", "llm_backbone"}  # as single-stage Prismatic runs save them


def test_image_transforms_letterbox_and_resize_like_prismatic():
    spec = PrismaticSpec.from_ids("x", "dinov2-vit-l", "vicuna-v15-7b", "gelu-mlp", "letterbox").vision
    wide = Image.new("RGB", (448, 224), (255, 0, 0))
    boxed = ImageTransform(spec, "letterbox")(wide)
    assert boxed.shape == (3, 224, 224)
    mean, std = torch.tensor(spec.mean)[:, None], torch.tensor(spec.std)[:, None]
    fill = (torch.tensor([int(m * 255) for m in spec.mean], dtype=torch.float32)[:, None] / 255 - mean) / std
    red = (torch.tensor([1.0, 0.0, 0.0])[:, None] - mean) / std
    torch.testing.assert_close(boxed[:, 0, :], fill.expand(3, 224))  # the mean-coloured border, top row
    torch.testing.assert_close(boxed[:, 112, :], red.expand(3, 224))  # the image across the middle
    naive = ImageTransform(spec, "resize-naive")(wide)
    torch.testing.assert_close(naive[:, 0, :], red.expand(3, 224))  # squashed: no border anywhere
    cropped = ImageTransform(spec, "resize-crop")(Image.new("L", (300, 600), 255))
    assert cropped.shape == (3, 224, 224)


def test_single_stage_checkpoints_take_the_vit_from_timms_weights(tmp_path, cache_dir, family, monkeypatch):
    """No vision_backbone in the checkpoint: the weights come from timm's hub file, its classifier head dropped and
    its position embeddings resampled to the backbone's grid (here the twin's own ViT, saved at 48 px as timm)."""
    import dataclasses

    import huggingface_hub
    from safetensors.torch import save_file

    from mcollapse.models import prismatic

    spec = dataclasses.replace(prismatic.VISION_BACKBONES["tiny-dinov2-vit"], pretrained="timm/tiny-dinov2")
    monkeypatch.setitem(prismatic.VISION_BACKBONES, "tiny-dinov2-vit", spec)
    weights = {k.removeprefix("featurizer."): v.clone() for k, v in _checkpoint(family.checkpoint)
               ["vision_backbone"].items()}
    grid = weights["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    weights["pos_embed"] = F.interpolate(grid, size=(6, 6), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 36, 32)
    weights["head.weight"], weights["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, **kw: fetched.append((repo, name)) or str(tmp_path / name))

    single_stage = _variant(tmp_path / "run", cache_dir, with_vision=False)
    assert fetched == [("timm/tiny-dinov2", "model.safetensors")]
    loaded = single_stage.model.vision_backbone["featurizer"]
    original = family.model.vision_backbone["featurizer"]
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)
    assert loaded.pos_embed.shape == (1, 16, 32) and not torch.equal(loaded.pos_embed, weights["pos_embed"][:, :16])
    torch.testing.assert_close(loaded.pos_embed, prismatic.resample_position_embedding(weights["pos_embed"], spec))


@pytest.mark.parametrize("name,run", [("prismatic_dinov2", "dinov2-224px+7b"), ("prismatic_siglip", "siglip-224px+7b")])
def test_real_configs_name_the_released_runs_and_fail_offline_in_one_line(name, run, monkeypatch, tmp_path):
    cfg = model_cfg(name)
    assert (cfg.name, cfg.family, cfg.modality, cfg.prompt) == (name, "prismatic", "image", "Describe this image.")
    assert cfg.hub_id == f"TRI-ML/prismatic-vlms/{run}" and cfg.revision and cfg.dtype == "auto"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        load_model(cfg, tmp_path, "cpu")
    assert cfg.hub_id in _one_line(err) and "model.local_path" in str(err.value)
