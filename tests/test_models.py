"""Where checkpoints come from: offline builds, local dirs, and a clear line when the hub is out of reach."""

from __future__ import annotations

import pytest
import torch

from mcollapse.errors import UserError
from mcollapse.models import load_model, resolve_dtype
from mcollapse.models.twins import ensure_tiny_checkpoint
from tests.helpers import model_cfg


def test_local_checkpoint_dir_loads_through_the_same_path(cache_dir):
    path = ensure_tiny_checkpoint("tiny_llama", cache_dir)
    family = load_model(model_cfg("tiny_llama", build=None, local_path=str(path)), cache_dir, "cpu")
    assert family.checkpoint == str(path) and family.modality == "text"


def test_local_path_without_checkpoint_is_a_user_error(tmp_path, cache_dir):
    with pytest.raises(UserError, match="no config.json"):
        load_model(model_cfg("tiny_llama", build=None, local_path=str(tmp_path)), cache_dir, "cpu")


def test_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        load_model(model_cfg("llama"), tmp_path, "cpu")
    message = str(err.value)
    assert "meta-llama/Llama-3.1-8B" in message and "model.local_path" in message and "\n" not in message


def test_dtype_auto_is_fp32_on_cpu_bf16_on_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(UserError):
        resolve_dtype("float8", torch.device("cpu"))
