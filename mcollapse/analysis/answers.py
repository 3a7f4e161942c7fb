"""Reading a forced-choice answer out of generated text, strictly and leniently, and scoring it.

The prompt asks for JSON only, `{"answer": "<exact choice>"}`. The strict reading accepts exactly
that: the whole output (surrounding whitespace aside) is one JSON object whose only key is
`answer` and whose value is one of the choices verbatim. Task accuracy is computed on it.

The lenient reading is reported beside it, never instead: the answer value compared case- and
space-insensitively, or else exactly one choice named as a whole word in the text. It does not
take substrings (the earlier code counted "unhappy" as "happy") nor an output naming two choices.
"""

from __future__ import annotations

import json
import re

import numpy as np
from sklearn.metrics import confusion_matrix

INVALID = "(invalid)"


def strict_answer(text: str, choices: list[str]) -> str | None:
    try:
        parsed = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(parsed, dict) or list(parsed) != ["answer"]:
        return None
    value = parsed["answer"]
    return value if isinstance(value, str) and value in choices else None


def lenient_answer(text: str, choices: list[str]) -> str | None:
    by_folded = {_fold(c): c for c in choices}
    try:
        parsed = json.loads(text.strip())
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("answer"), str):
        if _fold(parsed["answer"]) in by_folded:
            return by_folded[_fold(parsed["answer"])]
    lowered = text.lower()
    named = [c for c in choices if re.search(rf"(?<![a-z0-9]){re.escape(c.lower())}(?![a-z0-9])", lowered)]
    return named[0] if len(named) == 1 else None


def _fold(value: str) -> str:
    return " ".join(value.lower().split())


def task_scores(gold: list[str], predicted: list[str | None], choices: list[str]) -> dict:
    """Accuracy, answered rate, per-class accuracy and the confusion matrix (an extra column counts
    unparseable answers, which are wrong)."""
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length")
    if not gold:
        raise ValueError("no answers to score")
    shown = [p if p is not None else INVALID for p in predicted]
    columns = list(choices) + [INVALID]
    matrix = confusion_matrix(gold, shown, labels=columns)[: len(choices)]
    correct = np.array([g == p for g, p in zip(gold, predicted)])
    per_class = {c: float(correct[[g == c for g in gold]].mean()) for c in choices if c in gold}
    return {
        "accuracy": float(correct.mean()),
        "answered": float(np.mean([p is not None for p in predicted])),
        "n": len(gold),
        "per_class_accuracy": per_class,
        "confusion": {"rows": list(choices), "columns": columns, "counts": matrix.tolist()},
    }
