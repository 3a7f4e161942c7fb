"""The forced-choice task of the LoRA experiment: its prompt, its answers, and how it is scored.

The prompt has the paper's shape (Appendix B.4): a system turn naming what to identify, then the
user turn with the audio/image, the question, the choices as a JSON list and the instruction to
answer with JSON only; the assistant's target is `{"answer": "<choice>"}` and end-of-turn.

Two readings of the trained decoder on held-out samples:
* generated: greedy decoding, parsed strictly (task accuracy) and leniently (reported beside it);
* likelihood: the choice whose whole answer has the highest log-probability, which says what the
  decoder prefers even when it does not follow the output format.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from mcollapse.analysis.answers import lenient_answer, strict_answer
from mcollapse.errors import UserError
from mcollapse.models.base import ChatFamily
from mcollapse.models.decoder import Decoder

INSTRUCTION = ("Your answer MUST be exactly one of the CHOICES above, copied verbatim.\n"
               'Output JSON only: {"answer": "<exact choice>"}')


def task_prompt(exp, modality: str, label: str, choices: list[str]) -> tuple[str, str]:
    """(system, user) texts of the forced-choice prompt for `label`."""
    if label not in exp.questions:
        raise UserError(f"experiment.questions has no entry for label '{label}': add "
                        f"experiment.questions.{label}={{what: ..., question: ...}}")
    if modality not in exp.system:
        raise UserError(f"experiment.system has no system prompt for {modality} models")
    entry = exp.questions[label]
    system = exp.system[modality].format(what=entry.what)
    user = f"QUESTION: {entry.question}\nCHOICES: {json.dumps(list(choices))}\n\n{INSTRUCTION}"
    return system, user


def json_answer(choice: str) -> str:
    return json.dumps({"answer": choice})


def answer_tokens(family: ChatFamily, choice: str) -> list[int]:
    return family.answer_token_ids(json_answer(choice))


def evaluate(decoder: Decoder, arrays: list[np.ndarray], gold: list[str], choices: list[str], parts,
             batch_size: int, max_new_tokens: int) -> list[dict]:
    """Per sample: the generated text, its strict and lenient readings, the likelihood choice and
    the log-probability of each choice's answer."""
    family = decoder.family
    tokenizer = family.tokenizer
    texts: list[str] = [""] * len(arrays)
    order = sorted(range(len(arrays)), key=lambda i: arrays[i].shape[0])
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        generated = decoder.greedy([torch.as_tensor(arrays[i]).float() for i in chunk], parts, max_new_tokens)
        for i, tokens in zip(chunk, generated):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    options = [answer_tokens(family, c) for c in choices]
    results = []
    with torch.no_grad():
        for i, array in enumerate(arrays):
            scores = decoder.answer_scores(torch.as_tensor(array).float(), options, parts).cpu().numpy()
            results.append({"gold": gold[i], "generated": texts[i],
                            "strict": strict_answer(texts[i], choices), "lenient": lenient_answer(texts[i], choices),
                            "likelihood": choices[int(np.argmax(scores))],
                            **{f"logp[{c}]": float(s) for c, s in zip(choices, scores)}})
    return results
