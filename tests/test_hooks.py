"""Hook roles resolve and fire on every family; pooling ignores padding (batch == singles)."""

from __future__ import annotations

import pytest
import torch

from mcollapse.extraction.extract import _mask_for
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.pooling import masked_mean
from mcollapse.models import load_model
from mcollapse.models.roles import HookResolutionError, resolve_hooks
from tests.helpers import audio_samples, image_samples, model_cfg


@pytest.fixture(scope="module")
def families(cache_dir):
    return {name: load_model(model_cfg(name), cache_dir, "cpu")
            for name in ("tiny_qwen2audio", "tiny_llava", "tiny_llama", "tiny_paligemma2", "tiny_gemma2")}


def _targets(family, layer=16):
    return resolve_hooks(family.model, family.roles, layer, {}, family.adapter_module_names())


def _pooled(family, batch, pooling="all"):
    targets = _targets(family)
    inputs = dict(batch.inputs)
    hidden = capture(family.model, targets, lambda: family.model(**inputs, use_cache=False))
    return {t.name: masked_mean(hidden[t.name], _mask_for(t, batch, pooling, hidden[t.name])) for t in targets}


def test_roles_resolve_by_structure(families):
    qwen = {t.role: t for t in _targets(families["tiny_qwen2audio"])}
    assert qwen["llm_layer"].path.endswith("layers.16") and qwen["llm_layer"].name == "llm_layer_16"
    assert qwen["llm_final"].path.endswith("norm")
    assert qwen["adapter_output"].path.endswith("multi_modal_projector")
    assert qwen["encoder_output"].capture == "input"
    llava = {t.role: t for t in _targets(families["tiny_llava"])}
    assert "language_model" in llava["llm_layer"].path
    text = _targets(families["tiny_llama"])
    assert [t.role for t in text] == ["llm_layer", "llm_final"]
    pali = {t.role: t for t in _targets(families["tiny_paligemma2"])}
    assert pali["encoder_output"].path.endswith("multi_modal_projector") and pali["encoder_output"].capture == "input"
    assert pali["adapter_output"].capture == "output"
    assert "language_model.layers.16" in pali["llm_layer"].path and pali["llm_final"].path.endswith("norm")
    assert [t.role for t in _targets(families["tiny_gemma2"])] == ["llm_layer", "llm_final"]


def test_unresolvable_hook_names_nearby_modules(families):
    with pytest.raises(HookResolutionError) as err:
        resolve_hooks(families["tiny_qwen2audio"].model, ["llm_layer"], 99, {})
    assert "out of range" in str(err.value) and "nearby modules" in str(err.value)
    with pytest.raises(HookResolutionError) as err:
        resolve_hooks(families["tiny_qwen2audio"].model, ["adapter_output"], 16, {"adapter_output": "model.nope"})
    assert "model." in str(err.value)


def test_explicit_path_override_wins(families):
    model = families["tiny_qwen2audio"].model
    path = next(n for n, _ in model.named_modules() if n.endswith("audio_tower.layer_norm"))
    target = resolve_hooks(model, ["encoder_output"], 16, {"encoder_output": path})[0]
    assert target.path == path and target.capture == "output"


@pytest.mark.parametrize("name", ["tiny_qwen2audio", "tiny_llava", "tiny_paligemma2"])
@pytest.mark.parametrize("pooling", ["all", "modality"])
def test_batch_of_padded_samples_equals_singles(families, name, pooling):
    family = families[name]
    samples = audio_samples([0.7, 1.9, 1.2, 3.1]) if name == "tiny_qwen2audio" else image_samples(4)
    together = _pooled(family, family.prepare(samples), pooling)
    for i, sample in enumerate(samples):
        alone = _pooled(family, family.prepare([sample]), pooling)
        for hook, vectors in together.items():
            torch.testing.assert_close(vectors[i], alone[hook][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_qwen2audio", "tiny_llava", "tiny_llama", "tiny_paligemma2", "tiny_gemma2"])
def test_text_batches_equal_singles(families, name):
    family = families[name]
    texts = ["a short one", "a much longer sentence with many more words in it", "mid length text"]
    fmt = "raw" if name in ("tiny_llama", "tiny_gemma2") else "prompt"
    batch = family.prepare_text(["0", "1", "2"], texts, fmt=fmt)
    targets = resolve_hooks(family.model, ["llm_layer", "llm_final"], 16, {})
    hidden = capture(family.model, targets, lambda: family.model(**batch.inputs, use_cache=False))
    for i, text in enumerate(texts):
        single = family.prepare_text([str(i)], [text], fmt=fmt)
        alone = capture(family.model, targets, lambda: family.model(**single.inputs, use_cache=False))
        for t in targets:
            mine = masked_mean(hidden[t.name], batch.token_mask)[i]
            torch.testing.assert_close(mine, masked_mean(alone[t.name], single.token_mask)[0], rtol=1e-4, atol=1e-5)


def test_prompt_text_sits_where_the_audio_was(families):
    family = families["tiny_qwen2audio"]
    batch = family.prepare_text(["x"], ["hello world"], fmt="prompt")
    ids = batch.inputs["input_ids"][0][batch.modal_token_mask[0]]
    assert family.tokenizer.decode(ids).strip() == "hello world"
    prompt_ids = family.prepare(audio_samples([1.0])).inputs["input_ids"][0]
    tok = family.tokenizer
    assert tok.decode(batch.inputs["input_ids"][0][:3]) == tok.decode(prompt_ids[:3])


def test_audio_mask_matches_encoder_frames(families):
    family = families["tiny_qwen2audio"]
    batch = family.prepare(audio_samples([1.0, 2.0]))
    assert batch.modal_token_mask.sum(-1).tolist() == batch.frame_lengths.tolist()
    assert batch.frame_lengths[1] > batch.frame_lengths[0]


def test_capture_stops_after_the_deepest_hook(families):
    family = families["tiny_llama"]
    calls = []
    handle = family.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = family.prepare_text(["0"], ["stop early"], fmt="raw")
        capture(family.model, _targets(family), lambda: family.model(**batch.inputs, use_cache=False))
    finally:
        handle.remove()
    assert calls == []


def test_masked_mean_rejects_empty_rows():
    with pytest.raises(ValueError):
        masked_mean(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
