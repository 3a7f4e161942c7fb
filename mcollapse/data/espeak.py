"""espeak-ng synthesis shared by the generated speech sets: one call per clip, 16 kHz mono out."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.errors import UserError


def espeak_binary(dataset: str) -> str:
    """The espeak-ng executable, or a one-line UserError saying how to get it."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise UserError(
            f"the {dataset} dataset needs espeak-ng: install it (apt-get install espeak-ng)"
        )
    return binary


def synthesize(binary: str, voice: str, text: str, raw: Path, *, pitch: int, speed: int,
               amplitude: int = 100) -> np.ndarray:
    """Speak `text` with espeak-ng into the scratch file `raw` (removed after) and return the
    clip as float32 mono at SAMPLE_RATE (soxr HQ resampling), clipped to [-1, 1]."""
    import soundfile as sf
    import soxr

    prosody = ["-p", str(pitch), "-s", str(speed), "-a", str(amplitude)]
    command = [binary, "-v", voice, *prosody, "-w", str(raw), text]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not raw.is_file():
        message = (result.stderr or result.stdout or "no output").strip().splitlines()[0]
        raise UserError(f"espeak-ng failed for voice {voice}: {message}")
    audio, rate = sf.read(str(raw), dtype="float32")
    raw.unlink()
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    return np.clip(audio, -1.0, 1.0)
