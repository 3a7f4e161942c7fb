"""TRI-ML Prismatic VLMs (ViT vision backbone, MLP projector, Vicuna v1.5), loaded natively.

A Prismatic run dir holds `config.json`, whose "model" section names the vision backbone, the LLM backbone, the
projector (`arch_specifier`) and the image resize strategy, and `checkpoints/latest-checkpoint.pt`, a torch file
`{"model": {"projector": ..., "llm_backbone": ..., ["vision_backbone": ...]}}` of per-component state dicts.
The module tree here mirrors Prismatic's (`vision_backbone.featurizer`, `projector.projector`, `llm_backbone.llm`),
so a checkpoint key `k` of component `c` is our `c.k`, and loading is strict.

The ViT (`mcollapse.models.vit`) uses timm's parameter names without importing timm; its features are the ones
Prismatic reads. Single-stage checkpoints leave the (frozen) vision backbone out; its weights then come from
timm's hub repo.

Prismatic puts the projected patches right after BOS. `prepare()` writes `n_patches` placeholder ids there (an
embedding row past the tokenizer's vocabulary, which no text produces) and the forward swaps in the patches, so
the sequence the LLM sees, and the positions its answers are scored at, are the ones Prismatic's forward builds.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from mcollapse.data.base import Sample
from mcollapse.errors import UserError
from mcollapse.models.base import Batch, ChatFamily
from mcollapse.models.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ViTFeaturizer,
    ViTSpec,
    resample_position_embedding,
)

CHECKPOINT = Path("checkpoints") / "latest-checkpoint.pt"
COMPONENTS = ("vision_backbone", "projector", "llm_backbone")
RESIZE_STRATEGIES = ("letterbox", "resize-naive", "resize-crop")
PAD_TOKEN = "<PAD>"  # what Prismatic adds to Llama tokenizers, which have none
VOCAB_MULTIPLE = 64  # Prismatic pads the resized embedding matrix to a multiple of 64 rows

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class LlmSpec:
    """A Llama-2-shaped LLM backbone; `vocab` is its tokenizer's size before Prismatic adds `<PAD>`."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5
    tokenizer: str | None = None  # hub repo Prismatic takes the tokenizer from (None: the run dir must hold it)

    @property
    def embedding_rows(self) -> int:
        return math.ceil((self.vocab + 1) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# Prismatic's vision backbone ids with one timm ViT each (the fused DINO+SigLIP/CLIP ones are not supported);
# the offline twin adds its own ids to this table and to LLM_BACKBONES.
VISION_BACKBONES = {
    "dinov2-vit-l": ViTSpec(224, 14, 1024, 24, 16, layer_scale=True, reg_tokens=4, no_embed_class=True,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            pretrained="timm/vit_large_patch14_reg4_dinov2.lvd142m"),
    "siglip-vit-so400m": ViTSpec(224, 14, 1152, 27, 16, mlp_ratio=3.7362, class_token=False, attention_pool=True,
                                 pretrained="timm/vit_so400m_patch14_siglip_224.webli"),
    "siglip-vit-so400m-384px": ViTSpec(384, 14, 1152, 27, 16, mlp_ratio=3.7362, class_token=False,
                                       attention_pool=True, pretrained="timm/vit_so400m_patch14_siglip_384.webli"),
    "siglip-vit-b16-224px": ViTSpec(224, 16, 768, 12, 12, class_token=False, attention_pool=True,
                                    pretrained="timm/vit_base_patch16_siglip_224.webli"),
    "clip-vit-b": ViTSpec(224, 16, 768, 12, 12, pre_norm=True, quick_gelu=True, norm_eps=1e-5,
                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=0.9,
                          pretrained="timm/vit_base_patch16_clip_224.openai"),
    "clip-vit-l": ViTSpec(224, 14, 1024, 24, 16, pre_norm=True, quick_gelu=True, norm_eps=1e-5,
                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                          pretrained="timm/vit_large_patch14_clip_224.openai"),
    "clip-vit-l-336px": ViTSpec(336, 14, 1024, 24, 16, pre_norm=True, quick_gelu=True, norm_eps=1e-5,
                                mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                pretrained="timm/vit_large_patch14_clip_336.openai"),
    "in1k-vit-l": ViTSpec(224, 16, 1024, 24, 16, pretrained="timm/vit_large_patch16_224.augreg_in21k_ft_in1k"),
}

# Vicuna v1.5 (Llama-2 architecture): Prismatic builds it from the hub config and takes every weight from its
# own checkpoint; the shapes are fixed here so that nothing but the tokenizer comes from the LLM's repo.
LLM_BACKBONES = {
    "vicuna-v15-7b": LlmSpec(4096, 11008, 32, 32, 32, 32000, tokenizer="lmsys/vicuna-7b-v1.5"),
    "vicuna-v15-13b": LlmSpec(5120, 13824, 40, 40, 40, 32000, tokenizer="lmsys/vicuna-13b-v1.5"),
}

def projector_kind(arch_specifier: str) -> str:
    """Prismatic's rule: exactly `linear`, or a name ending in `fused-gelu-mlp` / `gelu-mlp` (`no-align+gelu-mlp`)."""
    if arch_specifier == "linear":
        return "linear"
    for kind in ("fused-gelu-mlp", "gelu-mlp"):
        if arch_specifier.endswith(kind):
            return kind
    raise UserError(f"Prismatic arch_specifier '{arch_specifier}' is not supported (expected linear, "
                    "[no-align+]gelu-mlp or [no-align+]fused-gelu-mlp)")


@dataclass(frozen=True)
class PrismaticSpec:
    """The "model" section of a run dir's config.json, resolved to architectures."""

    model_id: str
    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    image_resize_strategy: str
    vision: ViTSpec
    llm: LlmSpec

    @classmethod
    def from_ids(cls, model_id: str, vision_backbone_id: str, llm_backbone_id: str, arch_specifier: str,
                 image_resize_strategy: str) -> "PrismaticSpec":
        visions, llms = VISION_BACKBONES, LLM_BACKBONES
        if vision_backbone_id not in visions:
            raise UserError(f"Prismatic vision_backbone_id '{vision_backbone_id}' is not supported "
                            f"(expected one of {', '.join(visions)})")
        if llm_backbone_id not in llms:
            raise UserError(f"Prismatic llm_backbone_id '{llm_backbone_id}' is not supported "
                            f"(expected one of {', '.join(llms)})")
        projector_kind(arch_specifier)
        if image_resize_strategy not in RESIZE_STRATEGIES:
            raise UserError(f"Prismatic image_resize_strategy '{image_resize_strategy}' is not supported "
                            f"(expected one of {', '.join(RESIZE_STRATEGIES)})")
        return cls(model_id, vision_backbone_id, llm_backbone_id, arch_specifier, image_resize_strategy,
                   visions[vision_backbone_id], llms[llm_backbone_id])

    @classmethod
    def read(cls, run_dir: Path) -> "PrismaticSpec":
        """The spec of a run dir, or one line saying why the dir is not a Prismatic run."""
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{run_dir} is not a Prismatic run dir: config.json unreadable ({err})") from None
        section = config.get("model") if isinstance(config, dict) else None
        needed = ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy")
        if not isinstance(section, dict) or any(key not in section for key in needed):
            model_type = config.get("model_type") if isinstance(config, dict) else None
            found = f"model_type '{model_type}'" if model_type else "no such section"
            raise UserError(f"{run_dir} is not a Prismatic run dir: expected config.json with a 'model' section "
                            f"naming {', '.join(needed)}, found {found}")
        return cls.from_ids(str(section.get("model_id", run_dir.name)), *(str(section[key]) for key in needed))

    def to_config(self) -> dict:
        return {"model": {"model_id": self.model_id, "arch_specifier": self.arch_specifier,
                          "vision_backbone_id": self.vision_backbone_id, "llm_backbone_id": self.llm_backbone_id,
                          "image_resize_strategy": self.image_resize_strategy}}


class PrismaticConfig(PretrainedConfig):
    """What identifies the composite model (the rest of the code reads `model.config`)."""

    model_type = "prismatic"

    def __init__(self, vision_backbone_id: str = "", llm_backbone_id: str = "", arch_specifier: str = "",
                 image_resize_strategy: str = "", **kwargs):
        self.vision_backbone_id = vision_backbone_id
        self.llm_backbone_id = llm_backbone_id
        self.arch_specifier = arch_specifier
        self.image_resize_strategy = image_resize_strategy
        super().__init__(**kwargs)


# --- projector and composite -------------------------------------------------------------------------------


class Projector(nn.Module):
    """Prismatic's projectors, with their checkpoint names: `projector` is the Linear or the Sequential."""

    def __init__(self, arch_specifier: str, vision_width: int, llm_width: int):
        super().__init__()
        kind = projector_kind(arch_specifier)
        if kind == "linear":
            self.projector = nn.Linear(vision_width, llm_width)
        elif kind == "gelu-mlp":
            self.projector = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(),
                                           nn.Linear(llm_width, llm_width))
        else:
            hidden = 4 * vision_width
            self.projector = nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, llm_width),
                                           nn.GELU(), nn.Linear(llm_width, llm_width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.projector(patches)


def llama_config(spec: LlmSpec) -> LlamaConfig:
    return LlamaConfig(vocab_size=spec.embedding_rows, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                       rms_norm_eps=spec.rms_norm_eps, bos_token_id=1, eos_token_id=2, pad_token_id=spec.vocab,
                       tie_word_embeddings=False)


class PrismaticVLM(nn.Module):
    """Vision backbone -> projector -> Llama, with the patches at the placeholder positions of `input_ids`."""

    def __init__(self, spec: PrismaticSpec):
        super().__init__()
        self.config = PrismaticConfig(spec.vision_backbone_id, spec.llm_backbone_id, spec.arch_specifier,
                                      spec.image_resize_strategy)
        # ModuleDicts only to give the checkpoint's key prefixes: vision_backbone.featurizer.*, llm_backbone.llm.*
        self.vision_backbone = nn.ModuleDict({"featurizer": ViTFeaturizer(spec.vision)})
        self.projector = Projector(spec.arch_specifier, spec.vision.width, spec.llm.hidden)
        self.llm_backbone = nn.ModuleDict({"llm": LlamaForCausalLM(llama_config(spec.llm))})
        self.n_patches = spec.vision.n_patches
        self.image_token_id = spec.llm.vocab + 1  # the first row past the tokenizer and its added <PAD>

    @property
    def llm(self) -> LlamaForCausalLM:
        return self.llm_backbone["llm"]

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, use_cache: bool = False, **llm_kwargs):
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if pixel_values is not None:
            if not bool((slots.sum(dim=1) == self.n_patches).all()):
                raise ValueError(f"each row needs {self.n_patches} image placeholder ids to hold the patches")
            patches = self.projector(self.vision_backbone["featurizer"](pixel_values))
            embeds = embeds.masked_scatter(slots[..., None], patches.to(embeds.dtype))
        elif bool(slots.any()):
            raise ValueError("image placeholder ids given without pixel_values")
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=use_cache, **llm_kwargs)


# --- image transform ---------------------------------------------------------------------------------------


class ImageTransform:
    """Prismatic's eval transform for one backbone, on PIL images: [letterbox pad to square with the mean colour],
    resize (shorter side to image_size / crop_pct, or both sides to image_size for resize-naive; bicubic), centre
    crop, scale to [0, 1], normalise. The arithmetic follows torchvision's Resize/CenterCrop/ToTensor/Normalize."""

    def __init__(self, spec: ViTSpec, strategy: str):
        self.size = spec.image_size
        self.scale_size = math.floor(spec.image_size / spec.crop_pct)
        self.strategy = strategy
        self.fill = tuple(int(m * 255) for m in spec.mean)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.strategy == "letterbox":
            image = self._letterbox(image)
        if self.strategy == "resize-naive":
            image = self._resize(image, (self.size, self.size))
        else:
            width, height = image.size
            short, long = sorted((width, height))
            scaled = (self.scale_size, int(self.scale_size * long / short))
            image = self._resize(image, scaled if width <= height else scaled[::-1])
        image = self._center_crop(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (pixels - self.mean) / self.std

    def _letterbox(self, image: Image.Image) -> Image.Image:
        """Symmetric padding of int((side - w) / 2) on both sides (an odd difference leaves it 1 px short)."""
        width, height = image.size
        side = max(width, height)
        pad_x, pad_y = int((side - width) / 2), int((side - height) / 2)
        canvas = Image.new("RGB", (width + 2 * pad_x, height + 2 * pad_y), self.fill)
        canvas.paste(image, (pad_x, pad_y))
        return canvas

    @staticmethod
    def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)

    def _center_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if (width, height) == (self.size, self.size):
            return image
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


@dataclass
class PrismaticProcessor:
    tokenizer: object
    image_transform: ImageTransform


# --- loading -----------------------------------------------------------------------------------------------


def run_dir_from_hub(hub_id: str, hub_kwargs: dict) -> Path:
    """`<owner>/<repo>/<run dir>` (TRI-ML keeps every run in one repo): fetch its config and checkpoint."""
    from huggingface_hub import hf_hub_download

    owner, _, rest = hub_id.partition("/")
    repo, _, subdir = rest.partition("/")
    if not (owner and repo and subdir):
        raise UserError(f"Prismatic hub_id '{hub_id}' must name <owner>/<repo>/<run dir>")
    config = hf_hub_download(f"{owner}/{repo}", f"{subdir}/config.json", **hub_kwargs)
    hf_hub_download(f"{owner}/{repo}", f"{subdir}/{CHECKPOINT.as_posix()}", **hub_kwargs)
    return Path(config).parent


def load_tokenizer(run_dir: Path, spec: PrismaticSpec, offline: bool):
    """Prismatic's tokenizer: the LLM's own (from the run dir when it holds one, else the LLM's hub repo), right
    padding, `<PAD>` added when missing; it must add BOS, after which the patches go."""
    local = (run_dir / "tokenizer_config.json").is_file()
    if not local and spec.llm.tokenizer is None:
        raise UserError(f"{run_dir} holds no tokenizer and '{spec.llm_backbone_id}' names no hub repo for one")
    source = str(run_dir) if local else spec.llm.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline or local)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) != spec.llm.vocab + 1:
        raise UserError(f"tokenizer from {source} has {len(tokenizer)} tokens with {PAD_TOKEN}; "
                        f"'{spec.llm_backbone_id}' expects {spec.llm.vocab + 1}")
    if tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
        raise UserError(f"tokenizer from {source} does not start inputs with BOS, after which Prismatic puts patches")
    return tokenizer


def read_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The per-component state dicts of a Prismatic checkpoint, memory-mapped so a 7B one is not held twice."""
    if not path.is_file():
        raise UserError(f"Prismatic checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not read Prismatic checkpoint {path}: {first}") from None
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or not {"projector", "llm_backbone"} <= set(model):
        raise UserError(f"{path} is not a Prismatic checkpoint: expected {{'model': {{'projector', 'llm_backbone', "
                        f"['vision_backbone']}}}}, found {sorted(model) if isinstance(model, dict) else 'no model'}")
    unknown = set(model) - set(COMPONENTS)
    if unknown:
        raise UserError(f"{path} has components {sorted(unknown)} besides {', '.join(COMPONENTS)}")
    return model


def pretrained_vision_weights(spec: PrismaticSpec, offline: bool) -> dict[str, torch.Tensor]:
    """timm's weights for the backbone, as Prismatic loads them: classifier head dropped, position embeddings
    resampled to the backbone's image size."""
    vit = spec.vision
    if vit.pretrained is None:
        raise UserError(f"the checkpoint has no vision_backbone weights and '{spec.vision_backbone_id}' has no "
                        "pretrained weights to use instead")
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    try:
        path = hf_hub_download(vit.pretrained, "model.safetensors", local_files_only=offline)
    except OSError as err:
        raise UserError(f"the checkpoint has no vision_backbone weights and timm's '{vit.pretrained}' could not be "
                        f"fetched ({type(err).__name__}); fetch it once with hub access (it is cached)") from None
    weights = {k: v for k, v in load_file(path).items() if not k.startswith("head.")}
    expected = vit.n_patches + (0 if vit.no_embed_class else vit.n_prefix_tokens)
    if "pos_embed" in weights and weights["pos_embed"].shape[1] != expected:
        weights["pos_embed"] = resample_position_embedding(weights["pos_embed"], vit)
    return {f"featurizer.{k}": v for k, v in weights.items()}


def expected_shapes(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per component, the keys and shapes a checkpoint must hold (the model may be on the meta device)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {c: {} for c in COMPONENTS}
    for key, tensor in model.state_dict().items():
        component, _, rest = key.partition(".")
        shapes[component][rest] = tuple(tensor.shape)
    return shapes


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_components(components: dict[str, dict[str, torch.Tensor]], model: nn.Module, where: str) -> None:
    """Missing, unexpected and mis-shaped keys, all listed in one line."""
    problems = []
    for component, shapes in expected_shapes(model).items():
        given = components[component]
        missing, unexpected = set(shapes) - set(given), set(given) - set(shapes)
        wrong = [f"{k} {tuple(given[k].shape)} != {shapes[k]}" for k in sorted(set(shapes) & set(given))
                 if tuple(given[k].shape) != shapes[k]]
        if missing:
            problems.append(f"missing {component} keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {component} keys: {_listed(unexpected)}")
        if wrong:
            problems.append(f"mis-shaped {component} tensors: {_listed(wrong, 3)}")
    if problems:
        raise UserError(f"{where} does not fit this architecture: " + "; ".join(problems))


def load_prismatic(run_dir: Path, dtype: torch.dtype, offline: bool) -> tuple[PrismaticVLM, PrismaticProcessor]:
    """Build the model on the meta device and assign the checkpoint's tensors (cast to `dtype`; buffers such as
    the rotary frequencies stay float32), with the tokenizer and image transform."""
    from accelerate import init_empty_weights

    spec = PrismaticSpec.read(run_dir)
    tokenizer = load_tokenizer(run_dir, spec, offline)
    with init_empty_weights():
        model = PrismaticVLM(spec)
    components = dict(read_checkpoint(run_dir / CHECKPOINT))
    where = str(run_dir / CHECKPOINT)
    if "vision_backbone" not in components:
        components["vision_backbone"] = pretrained_vision_weights(spec, offline)
        where += f" (vision_backbone from {spec.vision.pretrained})"
    check_components(components, model, where)
    state = {f"{c}.{k}": v.to(dtype) for c, weights in components.items() for k, v in weights.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), PrismaticProcessor(tokenizer, ImageTransform(spec.vision, spec.image_resize_strategy))


def save_prismatic(model: PrismaticVLM, spec: PrismaticSpec, out_dir: Path, with_vision: bool = True) -> None:
    """Write `model` as a Prismatic run dir (config.json + checkpoints/latest-checkpoint.pt)."""
    components: dict[str, OrderedDict] = {c: OrderedDict() for c in COMPONENTS if with_vision or c != "vision_backbone"}
    for key, tensor in model.state_dict().items():
        component, _, rest = key.partition(".")
        if component in components:
            components[component][rest] = tensor.detach().clone()
    (out_dir / "config.json").write_text(json.dumps(spec.to_config(), indent=2))
    (out_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": components}, out_dir / CHECKPOINT)


# --- the family ----------------------------------------------------------------------------------------------


class PrismaticFamily(ChatFamily):
    """Prismatic VLMs in Vicuna v1.5's chat format, patches right after BOS."""

    modality = "image"
    placeholder = "<image>"  # a marker in the rendered prompt; its tokens are `n_patches` placeholder ids

    def _load_model(self) -> PrismaticVLM:
        offline = bool(self.hub_kwargs().get("local_files_only"))
        path = Path(self.checkpoint)
        run_dir = path if path.is_dir() else run_dir_from_hub(self.checkpoint, self.hub_kwargs())
        model, self._processor = load_prismatic(run_dir, self.dtype, offline)
        return model

    def _load_processor(self) -> PrismaticProcessor:
        return self._processor

    @property
    def placeholder_id(self) -> int:
        return int(self.model.image_token_id)

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        """Prismatic's Vicuna v1.5 prompt, `<system> USER: <message> ASSISTANT:` (default system line when none is
        configured; literal `<image>` tags are removed from the message as Prismatic does), after the media."""
        user = (self.cfg.prompt if user is None else user).replace(self.placeholder, "").strip()
        system = self.cfg.system_prompt if system is None else system
        system = VICUNA_SYSTEM_PROMPT if system is None else system.strip()
        turn = f"USER: {user} ASSISTANT:"
        return self.placeholder + (f"{system} {turn}" if system else turn)

    def prepare(self, samples: list[Sample]) -> Batch:
        pre, post = self.prompt_token_parts()
        row = pre + [self.placeholder_id] * self.model.n_patches + post
        input_ids = torch.tensor([row] * len(samples), dtype=torch.long)
        attention = torch.ones_like(input_ids)
        pixels = torch.stack([self.processor.image_transform(s.image) for s in samples])
        return Batch(
            ids=[s.id for s in samples],
            inputs={"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixels},
            token_mask=attention.bool(),
            modal_token_mask=input_ids == self.placeholder_id,
        )
