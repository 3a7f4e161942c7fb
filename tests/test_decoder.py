"""The LLM-only decoder: its scores equal the full model's, targets sit where they should, and
batched per-sample gradients equal one-by-one ones (padding never leaks between samples)."""

from __future__ import annotations

import pytest
import torch

from mcollapse.analysis.lipschitz import per_sample_gradient_norms
from mcollapse.errors import UserError
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.sequences import adapter_target
from mcollapse.models import load_model
from mcollapse.models.decoder import IGNORE, Decoder, compose, pad_sequences
from tests.helpers import audio_samples, image_samples, model_cfg

CASES = {
    "tiny_qwen2audio": lambda: audio_samples([1.0, 2.5, 1.7]),
    "tiny_llava": lambda: image_samples(3),
    "tiny_ultravox": lambda: audio_samples([1.0, 2.5, 1.7]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def loaded(request, cache_dir):
    family = load_model(model_cfg(request.param), cache_dir, "cpu")
    samples = CASES[request.param]()
    batch = family.prepare(samples)
    target = adapter_target(family)
    hidden = capture(family.model, [target], lambda: family.model(**batch.inputs))[target.name]
    lengths = batch.frame_lengths if batch.frame_lengths is not None else torch.full((len(samples),), hidden.shape[1])
    zs = [hidden[i, : int(lengths[i])].clone() for i in range(len(samples))]
    answers = [family.answer_token_ids(s.record.text) for s in samples]
    return family, samples, zs, answers


def _extended(inputs: dict, tokens: list[int]) -> dict:
    """One sample's model inputs with `tokens` appended to its text (per-position masks follow)."""
    width = inputs["input_ids"].shape[1]
    out = {}
    for key, value in inputs.items():
        if key == "input_ids":
            out[key] = torch.cat([value, torch.tensor([tokens], dtype=torch.long)], dim=1)
        elif value.dim() == 2 and value.shape[1] == width and key != "audio_values":
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, torch.full((1, len(tokens)), fill, dtype=value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def _full_model_answer_logprob(family, sample, answer) -> float:
    """log q(answer | media, prompt) from the whole multimodal model, encoder included."""
    inputs = family.prepare([sample]).inputs
    prompt_len = inputs["input_ids"].shape[1]
    inputs = _extended(inputs, answer)
    with torch.no_grad():
        logp = torch.log_softmax(family.model(**inputs).logits[0].float(), dim=-1)
    return float(sum(logp[prompt_len - 1 + k, tok] for k, tok in enumerate(answer)))


def test_content_scores_equal_the_full_models(loaded):
    family, samples, zs, answers = loaded
    decoder = Decoder(family)
    batch = compose(family, [len(z) for z in zs], answers, "content", "sum")
    ours = decoder.scores(batch, pad_sequences(zs)).detach()
    for i, sample in enumerate(samples):
        assert ours[i].item() == pytest.approx(_full_model_answer_logprob(family, sample, answers[i]), rel=1e-5)
    mean = decoder.scores(compose(family, [len(z) for z in zs], answers, "content", "mean"), pad_sequences(zs))
    counts = torch.tensor([len(a) for a in answers], dtype=torch.float32)
    torch.testing.assert_close(mean.detach(), ours / counts, rtol=1e-5, atol=1e-6)


def test_rows_match_the_processors_prompt_and_targets_sit_on_the_answer(loaded):
    family, samples, zs, answers = loaded
    batch = compose(family, [len(z) for z in zs], answers, "content", "sum")
    prepared = family.prepare(samples)
    for i in range(len(samples)):
        n = int(prepared.token_mask[i].sum())
        assert torch.equal(batch.input_ids[i, :n], prepared.inputs["input_ids"][i, :n])
        scored = batch.targets[i][batch.targets[i] != IGNORE].tolist()
        assert scored == answers[i]
        assert int(batch.targets[i].ne(IGNORE).nonzero()[0]) == n - 1  # the last prompt position
        assert answers[i][-1] == family.tokenizer.eos_token_id
    reference = compose(family, [len(z) for z in zs], None, "reference", "mean")
    for i in range(len(samples)):
        n = int(reference.attention_mask[i].sum())
        assert torch.equal(reference.targets[i, : n - 1], reference.input_ids[i, 1:n])
        assert (reference.targets[i, n - 1 :] == IGNORE).all()


def test_batched_gradients_equal_one_by_one(loaded):
    family, _, zs, answers = loaded
    decoder = Decoder(family)
    batch = compose(family, [len(z) for z in zs], answers, "content", "sum")
    norms, grad = per_sample_gradient_norms(lambda z: decoder.scores(batch, z), pad_sequences(zs),
                                            mask=batch.z_mask, return_grad=True)
    for i, z in enumerate(zs):
        alone = compose(family, [len(z)], [answers[i]], "content", "sum")
        norm_i, grad_i = per_sample_gradient_norms(lambda x: decoder.scores(alone, x), z[None], return_grad=True)
        assert norms[i].item() == pytest.approx(norm_i.item(), rel=1e-4)
        torch.testing.assert_close(grad[i, : len(z)], grad_i[0], rtol=1e-3, atol=1e-6)
        assert grad[i, len(z) :].abs().max().item() == 0.0 if len(z) < grad.shape[1] else True
    assert torch.all(norms > 0)


def test_gradient_matches_finite_differences(loaded):
    family, _, zs, answers = loaded
    decoder = Decoder(family)
    z = zs[0].double().float()
    batch = compose(family, [len(z)], [answers[0]], "content", "sum")
    _, grad = per_sample_gradient_norms(lambda x: decoder.scores(batch, x), z[None], return_grad=True)
    # along the gradient the slope is the norm itself: large enough to rise above float32 noise
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    direction = grad[0] / grad[0].norm() + 0.3 * noise / noise.norm()
    direction /= direction.norm()
    eps = 1e-3
    with torch.no_grad():
        up = decoder.scores(batch, (z + eps * direction)[None]).item()
        down = decoder.scores(batch, (z - eps * direction)[None]).item()
    assert (up - down) / (2 * eps) == pytest.approx(float((grad[0] * direction).sum()), rel=2e-2)


def test_bad_targets_are_refused(loaded):
    family, _, zs, _ = loaded
    with pytest.raises(UserError, match="not one of"):
        compose(family, [len(zs[0])], None, "prompt", "sum")
    with pytest.raises(UserError, match="reduction"):
        compose(family, [len(zs[0])], None, "reference", "max")
    with pytest.raises(ValueError, match="answer"):
        compose(family, [len(zs[0])], None, "content", "sum")


def test_shared_prompt_scoring_equals_one_row_per_pair(loaded):
    """Decoder.answer_scores (one prompt pass, its cache reused per answer) = the plain rows."""
    family, _, zs, answers = loaded
    decoder = Decoder(family)
    answers = answers + [family.answer_token_ids("x"), family.answer_token_ids("a much longer answer than most")]
    with torch.no_grad():
        for z in zs:
            shared = decoder.answer_scores(z, answers)
            rows = compose(family, [len(z)] * len(answers), answers, "content", "sum")
            plain = decoder.scores(rows, pad_sequences([z] * len(answers)))
            torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)


def test_greedy_decoding_equals_a_plain_loop_on_the_full_model(loaded):
    """Batched, right-padded greedy continuations from z match greedy decoding with the whole model
    (encoder included), one sample and one full forward per token."""
    family, samples, zs, _ = loaded
    decoder = Decoder(family)
    ours = decoder.greedy(zs, family.prompt_token_parts(), max_new_tokens=6)
    eos = family.tokenizer.eos_token_id
    for i, sample in enumerate(samples):
        inputs, expected = family.prepare([sample]).inputs, []
        for _ in range(6):
            with torch.no_grad():
                token = int(family.model(**_extended(inputs, expected), use_cache=False).logits[0, -1].argmax())
            if token == eos:
                break
            expected.append(token)
        assert ours[i] == expected
