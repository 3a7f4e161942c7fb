"""How close generated text is to the reference: WER (speech) and token F1 (captions).

Both compare normalised words: lower case, punctuation other than in-word apostrophes removed,
whitespace collapsed, so "Hello, world!" and "hello world" agree. WER is jiwer's (corpus-level:
total edits over total reference words); token F1 is SQuAD's bag-of-words F1, averaged over items.
"""

from __future__ import annotations

import re
from collections import Counter

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def normalise_words(text: str) -> list[str]:
    text = _NON_WORD.sub(" ", text.lower())
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER over the pairs; an empty hypothesis counts all its reference words as deleted."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError("one hypothesis per reference")
    pairs = [(" ".join(normalise_words(r)), " ".join(normalise_words(h))) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no reference has a word")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def token_f1(reference: str, hypothesis: str) -> float:
    ref, hyp = Counter(normalise_words(reference)), Counter(normalise_words(hypothesis))
    overlap = sum((ref & hyp).values())
    if not ref or not hyp or overlap == 0:
        return float(not ref and not hyp)
    precision, recall = overlap / sum(hyp.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(references: list[str], hypotheses: list[str]) -> float:
    if len(references) != len(hypotheses) or not references:
        raise ValueError("one hypothesis per reference, at least one")
    return sum(token_f1(r, h) for r, h in zip(references, hypotheses)) / len(references)
