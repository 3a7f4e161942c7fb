"""CREMA-D: every clip's labels are in its file name `<ActorID>_<SentenceCode>_<Emotion>_<Level>.wav`.

The text is the English sentence the sentence code stands for (the corpus has 12), so lexical and
text-baseline experiments see what the actor said.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from mcollapse.data.base import Record, media_problem
from mcollapse.errors import DataError

LAYOUT = "<root>/AudioWAV/<ActorID>_<SentenceCode>_<Emotion>_<Level>.wav"

SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
EMOTIONS = {
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sadness",
}
LEVELS = ("LO", "MD", "HI", "XX")  # low, medium, high, unspecified intensity

_FILE_NAME = re.compile(r"^(\d+)_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def parse_name(stem: str) -> dict[str, str] | str:
    """The label fields of one file name, or the reason it cannot be used."""
    match = _FILE_NAME.match(stem)
    if match is None:
        return "malformed file name"
    actor, sentence, emotion, level = match.groups()
    if sentence not in SENTENCES:
        return "unknown sentence code"
    if emotion not in EMOTIONS:
        return "unknown emotion code"
    if level not in LEVELS:
        return "unknown intensity level"
    return {
        "speaker_id": actor,
        "emotion": EMOTIONS[emotion],
        "sentence_code": sentence,
        "level": level,
    }


def load_part(root: Path) -> tuple[list[Record], Counter]:
    """Records for every well-formed, non-empty `.wav` in `AudioWAV/`; the rest are counted."""
    audio_dir = root / "AudioWAV"
    if not audio_dir.is_dir():
        raise DataError(f"{audio_dir} not found; expected {LAYOUT}")
    skipped: Counter = Counter()
    records: list[Record] = []
    for path in sorted(audio_dir.iterdir()):
        if path.suffix.lower() != ".wav" or not path.is_file():
            skipped["not a .wav file"] += 1
            continue
        parsed = parse_name(path.stem)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        problem = media_problem(path, "audio")
        if problem:
            skipped[problem] += 1
            continue
        records.append(Record(path.stem, path.resolve(), "audio", SENTENCES[parsed["sentence_code"]], parsed))
    return records, skipped
