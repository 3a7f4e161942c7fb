"""What every dataset module yields: cheap records first, media loaded on demand.

A record holds everything but the waveform/pixels, so selection, labels and cache keys never
touch media; `load_media` reads one record's audio or image and raises MediaError when the file is
unreadable, empty or corrupt (the caller skips and counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Record:
    """One sample without its media. `fields` holds raw label fields (speaker_id, emotion, object_count, ...)."""

    id: str
    path: Path
    modality: str  # "audio" or "image"
    text: str | None = None  # transcript / caption fed to text baselines and used by lexical labels
    fields: dict[str, str | int | float] = field(default_factory=dict)


def media_problem(path: Path, kind: str) -> str | None:
    """Why a media file a dataset lists cannot become a record (missing or empty), or None; loaders count it."""
    if not path.is_file():
        return f"missing {kind} file"
    if path.stat().st_size == 0:
        return "empty file"
    return None


@dataclass
class Sample:
    """A record with its media loaded: audio is float32 mono at 16 kHz, image is RGB PIL."""

    record: Record
    audio: np.ndarray | None = None
    image: object | None = None  # PIL.Image.Image

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def text(self) -> str | None:
        return self.record.text
