"""hook.llm_layers: every hidden_states index captured in one forward, equal to transformers' own."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mcollapse.config import HookConfig
from mcollapse.extraction.extract import hook_targets
from mcollapse.extraction.hooks import capture
from mcollapse.models import load_model
from mcollapse.models.roles import HookResolutionError, layer_indices
from tests.helpers import audio_samples, model_cfg


@pytest.fixture(scope="module")
def qwen(cache_dir):
    return load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")


def _hook_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(HookConfig), kw)


def test_every_layer_matches_transformers_hidden_states(qwen):
    batch = qwen.prepare(audio_samples([0.6, 1.1]))
    inputs = dict(batch.inputs)
    targets = [t for t in hook_targets(qwen, _hook_cfg(llm_layers="all")) if t.role == "llm_hidden"]
    hidden = capture(qwen.model, targets, lambda: qwen.model(**inputs, use_cache=False))
    with torch.no_grad():
        reference = qwen.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    assert len(targets) == len(reference)
    for index, ref in enumerate(reference):
        torch.testing.assert_close(hidden[f"llm_hs_{index}"], ref)


def test_default_hooks_unchanged_and_lists_resolve(qwen):
    default = hook_targets(qwen, _hook_cfg())
    assert [t.name for t in default] == ["encoder_output", "adapter_output", "llm_layer_16", "llm_final"]
    picked = hook_targets(qwen, _hook_cfg(llm_layers=[0, -1, 3]))
    last = len(layer_indices(qwen.model, "all")) - 1
    assert [t.name for t in picked][4:] == ["llm_hs_0", "llm_hs_3", f"llm_hs_{last}"]
    with pytest.raises(HookResolutionError):
        layer_indices(qwen.model, [999])
