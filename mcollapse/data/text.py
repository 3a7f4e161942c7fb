"""How transcripts/captions are normalised before anything reads them (`dataset.text_normalization`).

LibriSpeech ships its transcripts in upper case. Fed as they are, they are the content target,
the text-side embeddings and the text probes' input in a casing no LLM sees in normal prose, so
the text side would measure the casing as much as the content. The rule is applied once, when the
records are loaded, and is part of the dataset's fingerprint, so every cache keyed by it follows.
"""

from __future__ import annotations

import re

TEXT_NORMALIZATIONS = ("none", "sentence")
_PRONOUN_I = re.compile(r"(?<![\w'])i(?!\w)")  # "i" alone or before an apostrophe ("i'm", "i'll"), not in "it"
_FIRST_LETTER = re.compile(r"[^\W\d_]")


def normalize_text(text: str, rule: str) -> str:
    """`none`: as written. `sentence`: lower case with the first letter and the pronoun "I" (also in
    I'm, I'll, I'd, I've) upper case; apostrophes and everything else kept. Proper nouns are not
    recognised: "PARIS" becomes "paris"."""
    if rule == "none":
        return text
    if rule != "sentence":
        raise ValueError(f"unknown text normalisation {rule!r}")
    lowered = _PRONOUN_I.sub("I", text.lower())
    first = _FIRST_LETTER.search(lowered)
    if first is None:
        return lowered
    return lowered[: first.start()] + lowered[first.start()].upper() + lowered[first.start() + 1 :]
