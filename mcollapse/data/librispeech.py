"""LibriSpeech in the OpenSLR layout (e.g. test-clean untarred as it ships).

Transcripts are read exactly as written (LibriSpeech is upper case); `load_records` then applies
`dataset.text_normalization` (sentence case in conf/dataset/librispeech.yaml, see data/text.py).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from mcollapse.data.base import Record
from mcollapse.errors import DataError

LAYOUT = (
    "<root>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac "
    "with <speaker>-<chapter>.trans.txt beside them"
)
_UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
CONFLICTING_TRANSCRIPTS = "utterance id with conflicting transcripts"


def _transcript_lines(path: Path) -> list[str]:
    """The lines of a `.trans.txt`; a byte that is not UTF-8 is one line naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                        "transcripts must be UTF-8 text") from None


def _read_transcripts(paths: list[Path], skipped: Counter) -> tuple[dict[str, str], set[str]]:
    """Utterance id -> transcript from every `.trans.txt` (one `<utt-id> <TEXT>` per line).

    An id given twice with different text is dropped and counted: no line can be trusted."""
    transcripts: dict[str, str] = {}
    conflicting: set[str] = set()
    for path in paths:
        for line in _transcript_lines(path):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if not _UTTERANCE_ID.match(utt_id) or not text.strip():
                skipped["malformed transcript line"] += 1
                continue
            if transcripts.get(utt_id, text.strip()) != text.strip():
                conflicting.add(utt_id)
            transcripts[utt_id] = text.strip()
    if conflicting:
        skipped[CONFLICTING_TRANSCRIPTS] += len(conflicting)
    return {utt_id: text for utt_id, text in transcripts.items() if utt_id not in conflicting}, conflicting


def load_part(root: Path) -> tuple[list[Record], Counter]:
    """Records for every utterance that has both a FLAC file and a transcript line."""
    audio_files = sorted(root.glob("*/*/*.flac"))
    transcript_files = sorted(root.glob("*/*/*.trans.txt"))
    if not audio_files and not transcript_files:
        raise DataError(f"{root} holds no LibriSpeech files; expected {LAYOUT}")
    skipped: Counter = Counter()
    transcripts, conflicting = _read_transcripts(transcript_files, skipped)
    records: list[Record] = []
    seen: set[str] = set()
    for path in audio_files:
        match = _UTTERANCE_ID.match(path.stem)
        if match is None:
            skipped["malformed file name"] += 1
            continue
        seen.add(path.stem)
        if path.stem in conflicting:  # counted once, with its transcripts
            continue
        if path.stem not in transcripts:
            skipped["no transcript line"] += 1
            continue
        if path.stat().st_size == 0:
            skipped["empty file"] += 1
            continue
        speaker, chapter, _ = match.groups()
        records.append(
            Record(
                id=path.stem,
                path=path.resolve(),
                modality="audio",
                text=transcripts[path.stem],
                fields={"speaker_id": speaker, "chapter_id": chapter},
            )
        )
    missing_audio = len(transcripts.keys() - seen)
    if missing_audio:
        skipped["missing audio file"] += missing_audio
    return records, skipped
