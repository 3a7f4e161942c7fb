"""LoRA on the LLM only: where the trainable parameters are, the saved adapter applied at load time,
and training that resumes after an interruption exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mcollapse.cli import config_dir
from mcollapse.config import LoraSettings
from mcollapse.errors import UserError
from mcollapse.extraction.extract import model_identity
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.sequences import adapter_target
from mcollapse.models import load_model, lora_train
from mcollapse.models.decoder import Decoder
from mcollapse.models.lora import attach, llm_path, target_regex
from mcollapse.models.lora_train import Example, Trainer, answer_loss
from mcollapse.pipeline.lora_task import answer_tokens, task_prompt
from tests.helpers import audio_samples, model_cfg

TOWERS = {"tiny_qwen2audio": "model.audio_tower.", "tiny_llava": "model.vision_tower."}


def _settings(**overrides):
    return OmegaConf.merge(OmegaConf.structured(LoraSettings), overrides)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_trainable_parameters_are_only_in_the_llm(cache_dir, name):
    family = load_model(model_cfg(name), cache_dir, "cpu")
    tower_projections = [n for n, _ in family.model.named_modules() if n.startswith(TOWERS[name]) and
                         n.endswith("q_proj")]
    assert tower_projections, "the tower has q_proj linears a loose LoRA target would hit"
    peft_model = attach(family.model, _settings())
    trainable = [n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad]
    prefix = llm_path(family.model) + "."
    assert trainable and all(n.startswith(prefix) and ".lora_" in n for n in trainable)
    adapted = {n.split(".self_attn.")[1].split(".")[0] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(n.startswith(TOWERS[name]) for n, p in peft_model.named_parameters() if p.requires_grad)


def test_last_layers_limits_lora_to_the_top_of_the_stack(cache_dir):
    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    count = len(family.model.model.language_model.layers)
    peft_model = attach(family.model, _settings(last_layers=2))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert layers == {count - 2, count - 1}
    with pytest.raises(UserError, match="last_layers"):
        attach(load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu").model, _settings(last_layers=count + 1))


def test_target_regex_is_anchored_at_the_llm():
    import re

    pattern = re.compile(target_regex("model.language_model", ["q_proj", "o_proj"]))
    assert pattern.match("model.language_model.layers.3.self_attn.q_proj")
    assert not pattern.match("model.audio_tower.layers.3.self_attn.q_proj")
    assert not pattern.match("model.language_model.layers.3.self_attn.q_proj.lora_A")
    layered = re.compile(target_regex("model.language_model", ["q_proj"], [4, 5]))
    assert layered.match("model.language_model.layers.5.self_attn.q_proj")
    assert not layered.match("model.language_model.layers.15.self_attn.q_proj")


def _perturb(peft_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def test_saved_adapter_loads_through_model_lora(cache_dir, tmp_path):
    samples = audio_samples([1.2, 2.0])
    base = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    base_state = {k: v.clone() for k, v in base.model.state_dict().items()}
    peft_model = attach(base.model, _settings())
    _perturb(peft_model)
    batch = base.prepare(samples)
    with torch.no_grad():
        expected = peft_model(**batch.inputs).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    tuned = load_model(model_cfg("tiny_qwen2audio", lora=str(tmp_path / "adapter")), cache_dir, "cpu")
    with torch.no_grad():
        got = tuned.model(**tuned.prepare(samples).inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    tuned_state = tuned.model.state_dict()
    adapted = {k.split(".lora_")[0] for k in tuned_state if ".lora_" in k}
    assert adapted and all(k.startswith("model.language_model.") and k.split(".")[-1] in
                           ("q_proj", "k_proj", "v_proj", "o_proj") for k in adapted)
    for key, value in base_state.items():  # every base weight is there unchanged (unmerged: as base_layer)
        module, _, leaf = key.rpartition(".")
        torch.testing.assert_close(tuned_state.get(key, tuned_state.get(f"{module}.base_layer.{leaf}")), value,
                                   rtol=0, atol=0)
    assert model_identity(tuned)["lora"] and "lora" not in model_identity(base)


def test_a_small_update_that_bf16_merging_erases_is_kept(cache_dir, tmp_path):
    """bf16 weights round W + s B A back to W where the update is below half their ulp; the loaded
    LoRA model must still compute what the trained, unmerged adapter computes (as task accuracy did)."""
    samples = audio_samples([1.2])
    base = load_model(model_cfg("tiny_qwen2audio", dtype="bfloat16"), cache_dir, "cpu")
    batch = base.prepare(samples)
    with torch.no_grad():
        base_logits = base.model(**batch.inputs).logits.clone()
    peft_model = attach(base.model, _settings())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(2e-6 * torch.randn(p.shape, generator=generator))
        expected = peft_model(**batch.inputs).logits
        layers = [m for m in peft_model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]
        kept = sum(int((m.base_layer.weight + m.get_delta_weight("default").to(torch.bfloat16)
                        != m.base_layer.weight).sum()) for m in layers)
    assert kept < 0.05 * sum(m.base_layer.weight.numel() for m in layers)  # a bf16 merge erases > 95% of it
    assert not torch.equal(expected, base_logits)  # yet the unmerged adapter moves the output
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    tuned = load_model(model_cfg("tiny_qwen2audio", dtype="bfloat16", lora=str(tmp_path / "adapter")), cache_dir,
                       "cpu")
    with torch.no_grad():
        got = tuned.model(**tuned.prepare(samples).inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_adapter_reaching_into_the_towers_is_refused(cache_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    loose = get_peft_model(family.model, LoraConfig(r=4, target_modules=["q_proj"]))  # towers too
    loose.save_pretrained(str(tmp_path / "loose"))
    with pytest.raises(UserError, match="outside the LLM"):
        load_model(model_cfg("tiny_qwen2audio", lora=str(tmp_path / "loose")), cache_dir, "cpu")
    with pytest.raises(UserError, match="not a saved LoRA adapter"):
        load_model(model_cfg("tiny_qwen2audio", lora=str(tmp_path)), cache_dir, "cpu")


def _examples(family, samples, choices):
    target = adapter_target(family)
    batch = family.prepare(samples)
    hidden = capture(family.model, [target], lambda: family.model(**batch.inputs))[target.name]
    lengths = batch.frame_lengths
    return [Example(s.id, hidden[i, : int(lengths[i])].detach().numpy(),
                    answer_tokens(family, choices[i % len(choices)])) for i, s in enumerate(samples)]


def _trainer(cache_dir, state_dir, epochs=3):
    torch.manual_seed(0)
    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    decoder = Decoder(family)
    choices = ["calm", "loud"]
    exp = OmegaConf.create({"system": {"audio": "Identify the {what}."},
                            "questions": {"tone": {"what": "tone", "question": "Which tone?"}}})
    parts = family.prompt_token_parts(*reversed(task_prompt(exp, "audio", "tone", choices)))
    examples = _examples(family, audio_samples([1.0, 1.5, 2.0, 1.2, 1.8, 1.1]), choices)
    settings = _settings(epochs=epochs, patience=5, batch_size=2, grad_accum=2, lr=5e-3)
    trainer = Trainer(decoder, attach(family.model, settings), settings, parts, state_dir, 7, 4)
    return trainer, examples[:4], examples[4:]


def _adapter(trainer):
    from peft import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def test_interrupted_training_resumes_to_the_same_adapter(cache_dir, tmp_path, monkeypatch):
    straight, train, val = _trainer(cache_dir, tmp_path / "straight")
    outcome = straight.fit(train, val)
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3] and outcome.steps == 3
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]

    interrupted, train, val = _trainer(cache_dir, tmp_path / "resumed")
    original = Trainer._epoch

    def crash_in_epoch_3(self, examples, epoch, state):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, examples, epoch, state)

    monkeypatch.setattr(Trainer, "_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(train, val)
    monkeypatch.setattr(Trainer, "_epoch", original)
    resumed, train, val = _trainer(cache_dir, tmp_path / "resumed")
    again = resumed.fit(train, val)
    assert again.resumed_at_epoch == 2 and again.history == outcome.history and again.steps == outcome.steps
    for key, value in _adapter(straight).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=0, atol=0)
    finished, train, val = _trainer(cache_dir, tmp_path / "resumed")
    assert finished.fit(train, val).resumed_at_epoch == 3  # a finished training is not repeated


def test_the_best_epoch_is_reloaded_before_evaluation(cache_dir, tmp_path):
    trainer, train, val = _trainer(cache_dir, tmp_path / "best", epochs=2)
    outcome = trainer.fit(train, val)
    best_state = json.loads((trainer.best_dir / "adapter_config.json").read_text())
    assert best_state["r"] == 16
    _perturb(trainer.model, seed=3)  # what is in memory is no longer the best epoch
    trainer.load_best()
    loss, _ = answer_loss(trainer.decoder, val, trainer.parts, 4)
    assert loss == pytest.approx(outcome.best_val_loss, rel=1e-6)
    assert lora_train.STATE_FILE in {p.name for p in trainer.state_dir.iterdir()}


def test_forced_choice_prompt_has_the_papers_shape(cache_dir):
    family = load_model(model_cfg("tiny_llava"), cache_dir, "cpu")
    exp = OmegaConf.load(Path(config_dir()) / "experiment" / "lora.yaml").experiment
    system, user = task_prompt(exp, "image", "object_category", ["cat", "dog"])
    assert system.startswith("You are an expert image analyst") and "main object category" in system
    assert user.splitlines()[1] == 'CHOICES: ["cat", "dog"]'
    assert user.endswith('Output JSON only: {"answer": "<exact choice>"}')
    pre, post = family.prompt_token_parts(user, system)
    text = family.tokenizer.decode(pre + post)
    assert "You are an expert image analyst" in text and "QUESTION:" in text
    with pytest.raises(UserError, match="no entry for label"):
        task_prompt(exp, "image", "colour", ["red"])
