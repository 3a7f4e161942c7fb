"""The modality projector as a swappable part: its module, its weights on disk, and their digest.

`model.projector=<path>` puts trained projector weights into a model at load time (encoder and LLM
stay the checkpoint's). The path is a `.safetensors` file, a directory holding `projector.safetensors`
(a train_adapter run dir or one of its checkpoints), or `shipped:<name>` for an organism shipped
inside the package (`mcollapse/organisms/<name>/`). Weights are stored under the projector module's
own parameter names, so any family's projector round-trips.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from mcollapse.errors import UserError

WEIGHTS_FILE = "projector.safetensors"
SHIPPED_PREFIX = "shipped:"
ORGANISMS_DIR = Path(__file__).resolve().parent.parent / "organisms"


def projector_path(spec: str) -> Path:
    """The safetensors file a `model.projector` value names, or a one-line error."""
    spec = str(spec)
    if spec.startswith(SHIPPED_PREFIX):
        name = spec[len(SHIPPED_PREFIX):]
        path = ORGANISMS_DIR / name / WEIGHTS_FILE
        if not path.is_file():
            known = sorted(p.name for p in ORGANISMS_DIR.iterdir() if (p / WEIGHTS_FILE).is_file()) \
                if ORGANISMS_DIR.is_dir() else []
            raise UserError(f"no shipped projector '{name}' (shipped: {', '.join(known) or 'none'})")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"model.projector {spec}: no {WEIGHTS_FILE} there (give a file, a run dir or a checkpoint)")
    return path


def projector_digest(spec: str) -> str:
    """The weights' content hash: cache keys of everything downstream of the projector use it."""
    return hashlib.sha256(projector_path(spec).read_bytes()).hexdigest()[:16]


def projector_module(model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module]:
    """The projector (first of `names` found as a submodule name), with its path."""
    for wanted in names:
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] == wanted:
                return path, module
    raise UserError(f"no projector module ({', '.join(names)}) found on the model")


def load_projector(module: nn.Module, spec: str) -> None:
    """Copy the weights `model.projector` names into `module` (see `load_projector_file`)."""
    load_projector_file(module, projector_path(spec))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an empty, truncated or foreign file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"projector weights {path} are unreadable ({err}): not a complete safetensors file; "
                        "copy it again or point at another checkpoint") from None


def load_projector_file(module: nn.Module, path: Path) -> None:
    """Copy the weights in `path` into `module`; every tensor must match a parameter by name and shape
    and be finite (NaN weights would otherwise surface later as NaN activations, blamed on the samples)."""
    state = read_weights(path)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"projector weights {path} do not fit this model's projector "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]})")
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise UserError(f"projector weights {path} hold NaN or infinite values (in {', '.join(not_finite[:3])}): "
                        "the file is broken, not the samples")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name].to(dtype=tensor.dtype))


def save_projector(module: nn.Module, path: Path) -> None:
    """The projector's weights as float32 safetensors (written whole, then renamed into place)."""
    from safetensors.torch import save_file

    from mcollapse.store import atomic_path

    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
