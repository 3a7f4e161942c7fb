"""EfficientNet-Lite0 as a transformers vision model, so a LLaVA checkpoint can name it as its tower.

EfficientNet-Lite is EfficientNet made for mobile accelerators: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) that width scaling
leaves alone. Lite0 is the unscaled network: a 3x3 stride-2 stem, seven stages of MBConv
blocks (1x1 expansion, depthwise kxk, 1x1 linear projection, a residual when shape allows)
and a 1x1 head conv, each conv followed by batch norm. The pretrained weights come from
TensorFlow, so stride-2 convs pad the TF "same" way (the extra row/column on the bottom/right)
and batch norm uses TF's epsilon.

The model returns the feature maps flattened to sequences, `(batch, height * width, channels)`:
`hidden_states` holds the stem's, every block's and the head's output, `last_hidden_state` the
head's (7 x 7 = 49 positions of 1280 channels for a 224 x 224 image). With
`vision_feature_layer=-1` and `vision_feature_select_strategy="full"` LLaVA projects all 49.

Importing this module registers the config and model with `AutoConfig`/`AutoModel`, which is
what lets `LlavaForConditionalGeneration.from_pretrained` build the tower without remote code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "mcollapse_efficientnet_lite"

# EfficientNet-Lite0's stages: (repeats, kernel, first stride, expansion, output channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 224,
        stem_channels: int = 32,
        stages: list | tuple = LITE0_STAGES,
        hidden_size: int = 1280,
        batch_norm_eps: float = 1e-3,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.image_size = image_size
        self.stem_channels = stem_channels
        self.stages = [list(stage) for stage in stages]
        self.hidden_size = hidden_size  # the head's channels: what a projector reads
        self.batch_norm_eps = batch_norm_eps
        super().__init__(**kwargs)

    @property
    def output_stride(self) -> int:
        stride = 2  # the stem
        for _, _, first_stride, _, _ in self.stages:
            stride *= first_stride
        return stride


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv padded like TensorFlow's "same": output size ceil(input / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel in ((x.shape[-1], self.kernel_size[1]), (x.shape[-2], self.kernel_size[0])):
            out = -(-size // self.stride[0])
            total = max((out - 1) * self.stride[0] + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class ConvNorm(nn.Module):
    """Conv, batch norm and (unless `act` is False) ReLU6."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, act=True, eps=1e-3):
        super().__init__()
        self.conv = SamePadConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.norm = nn.BatchNorm2d(out_channels, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-and-excitation: expand, depthwise, linear projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int, eps: float):
        super().__init__()
        mid = in_channels * expansion
        self.expand = ConvNorm(in_channels, mid, 1, eps=eps) if expansion != 1 else None
        self.depthwise = ConvNorm(mid, mid, kernel, stride, groups=mid, eps=eps)
        self.project = ConvNorm(mid, out_channels, 1, act=False, eps=eps)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return h + x if self.residual else h


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvNorm(config.num_channels, config.stem_channels, 3, stride=2, eps=eps)
        blocks, channels = [], config.stem_channels
        for repeats, kernel, first_stride, expansion, out_channels in config.stages:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                blocks.append(MBConvBlock(channels, out_channels, kernel, stride, expansion, eps))
                channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvNorm(channels, config.hidden_size, 1, eps=eps)
        self.post_init()

    @property
    def patch_size(self) -> int:
        """Input pixels per output position along each side (32 for Lite0)."""
        return self.config.output_stride

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """`output_hidden_states` is read as a truth value (LLaVA passes the layer it selects)."""
        pixel_values = pixel_values.to(self.stem.conv.weight.dtype)
        x = self.stem(pixel_values)
        maps = [x]
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        x = self.head(x)
        maps.append(x)
        last = x.flatten(2).transpose(1, 2)
        pooled = last.mean(dim=1)
        wants_states = output_hidden_states is not None and output_hidden_states is not False
        if output_hidden_states is None:
            wants_states = bool(self.config.output_hidden_states)
        hidden_states = tuple(m.flatten(2).transpose(1, 2) for m in maps[:-1]) + (last,) if wants_states else None
        if return_dict is False:
            return tuple(v for v in (last, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
