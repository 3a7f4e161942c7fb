"""Hook roles on the full-size architectures (built on the meta device: structure, no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
)

from mcollapse.models.roles import resolve_hooks

ROLES = ("encoder_output", "adapter_output", "llm_layer", "llm_final")


def _paths(model, roles=ROLES, layer=16):
    return {t.role: (t.path, t.capture) for t in resolve_hooks(model, roles, layer, {})}


@pytest.fixture(scope="module")
def meta():
    with torch.device("meta"):
        yield


def test_qwen2audio_7b_roles(meta):
    model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig())
    paths = _paths(model)
    assert paths["llm_layer"] == ("model.language_model.layers.16", "output")
    assert paths["llm_final"] == ("model.language_model.norm", "output")
    assert paths["adapter_output"] == ("model.multi_modal_projector", "output")
    assert paths["encoder_output"] == ("model.multi_modal_projector", "input")


def test_llava_15_roles(meta):
    config = LlavaConfig(text_config=LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008))
    model = LlavaForConditionalGeneration(config)
    paths = _paths(model)
    assert paths["llm_layer"] == ("model.language_model.layers.16", "output")
    assert paths["encoder_output"] == ("model.multi_modal_projector", "input")


def test_llama_31_8b_roles(meta):
    config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256)
    model = AutoModelForCausalLM.from_config(config)
    paths = _paths(model, roles=("llm_layer", "llm_final"), layer=-1)
    assert paths == {"llm_layer": ("model.layers.31", "output"), "llm_final": ("model.norm", "output")}
