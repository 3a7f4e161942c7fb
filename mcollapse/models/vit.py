"""Vision transformers under timm's parameter names, read out as Prismatic reads them.

timm itself needs torchvision, whose PyPI wheels do not load beside the CPU build of torch this
project installs; these modules use only torch. Checkpoints and timm's pretrained weights load by
their own keys (last block, final norm and SigLIP's pooling head included), while the features are
Prismatic's: the patch tokens after the second-to-last block, class and register tokens dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcollapse.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTSpec:
    """A timm VisionTransformer as Prismatic builds it (`num_classes=0`, `img_size` = its default image size),
    and its eval image transform: resize the shorter side to image_size / crop_pct (bicubic for every supported
    backbone; Prismatic sets crop_pct 1 for SigLIP and IN1K), centre crop, normalise with mean and std."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings for patches only (DINOv2 with registers)
    pre_norm: bool = False  # a LayerNorm before the blocks, and no patch-embedding bias (CLIP)
    layer_scale: bool = False
    quick_gelu: bool = False  # OpenAI CLIP's activation, which Prismatic restores over timm's GELU
    norm_eps: float = 1e-6
    attention_pool: bool = False  # SigLIP's pooling head ('map'): loaded, never used for features
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    crop_pct: float = 1.0
    pretrained: str | None = None  # timm weights on the hub, for checkpoints without vision_backbone

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, spec.width, spec.patch_size, stride=spec.patch_size, bias=not spec.pre_norm)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class LayerScale(nn.Module):
    def __init__(self, width: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.attn = Attention(spec.width, spec.heads)
        self.ls1 = LayerScale(spec.width) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.quick_gelu)
        self.ls2 = LayerScale(spec.width) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """SigLIP's pooling head, under timm's names: part of the weights, not of Prismatic's features."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.q = nn.Linear(spec.width, spec.width)
        self.kv = nn.Linear(spec.width, 2 * spec.width)
        self.proj = nn.Linear(spec.width, spec.width)
        self.norm = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio))


class ViTFeaturizer(nn.Module):
    """timm's VisionTransformer(num_classes=0), read out as Prismatic does: patch tokens after block depth-2."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, spec.width)) if spec.reg_tokens else None
        positions = spec.n_patches + (0 if spec.no_embed_class else spec.n_prefix_tokens)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, positions, spec.width))
        self.norm_pre = nn.LayerNorm(spec.width, eps=spec.norm_eps) if spec.pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*(Block(spec) for _ in range(spec.depth)))
        self.norm = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.attn_pool = AttentionPoolLatent(spec) if spec.attention_pool else None

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.spec.no_embed_class:
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self._tokens(pixels))
        for block in self.blocks[:-1]:
            x = block(x)
        return x[:, self.spec.n_prefix_tokens :]


def resample_position_embedding(pos_embed: torch.Tensor, spec: ViTSpec) -> torch.Tensor:
    """Pretrained position embeddings at another resolution, resized to `spec`'s grid as timm does on load
    (bicubic, antialiased, in float32; prefix-token entries kept as they are)."""
    prefix = 0 if spec.no_embed_class else spec.n_prefix_tokens
    head, grid = pos_embed[:, :prefix], pos_embed[:, prefix:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise UserError(f"pretrained pos_embed {tuple(pos_embed.shape)} is not a square grid")
    image = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(spec.grid, spec.grid), mode="bicubic", antialias=True)
    grid = image.permute(0, 2, 3, 1).reshape(1, spec.grid * spec.grid, -1).to(pos_embed.dtype)
    return torch.cat([head, grid], dim=1)
