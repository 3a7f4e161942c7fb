"""Reading one record's audio or image, with one short reason when it cannot be used.

Audio is decoded with soundfile (WAV/FLAC; librosa.load would use the same decoder but fall
back to audioread with warnings) and resampled to 16 kHz with soxr at high quality, the
resampler librosa itself uses for `res_type="soxr_hq"`; calling it directly skips librosa's
first-call JIT warm-up of several seconds. Every model sees the same mono float32 signal.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mcollapse.data.base import SAMPLE_RATE, Record, Sample
from mcollapse.errors import MediaError

_LFS_POINTER = b"version https://git-lfs"
# libsndfile's header log: "data : <bytes the header declares> (should be <bytes the file holds>)"
_SHORT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _unreadable(path: Path, what: str, exc: BaseException) -> MediaError:
    """A MediaError that names the file and, for Git LFS pointers, says what they are."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_LFS_POINTER))
    except OSError:
        head = b""
    if not path.exists():
        reason = "file not found"
    elif path.stat().st_size == 0:
        reason = "empty file"
    elif head == _LFS_POINTER:
        reason = "a Git LFS pointer, not the media itself (fetch the real file)"
    else:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = f"unreadable {what}: {detail}"
    return MediaError(f"{path.name}: {reason}")


_BYTES_PER_SAMPLE = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                     "ULAW": 1, "ALAW": 1}


def _truncation(extra_info: str, frames_read: int, frames_declared: int, frame_bytes: int) -> str | None:
    """Why a file holds fewer frames than its header promises (libsndfile silently shortens a
    WAV whose data chunk is cut, and notes it in its header log); None when it is whole."""
    match = _SHORT_DATA_CHUNK.search(extra_info)
    if match and int(match.group(2)) < int(match.group(1)):
        declared_bytes, held_bytes = int(match.group(1)), int(match.group(2))
        if not frame_bytes:
            return f"truncated: the header promises {declared_bytes} data bytes, the file holds {held_bytes}"
        frames_declared = declared_bytes // frame_bytes
    if frames_read < frames_declared:
        return f"truncated: the header promises {frames_declared} frames, the file holds {frames_read}"
    return None


def read_audio(path: Path) -> np.ndarray:
    """float32 mono 16 kHz samples. Digital silence is unusable (nothing to probe), and so is a
    file cut short of what its header promises."""
    import soundfile as sf
    import soxr

    try:
        with sf.SoundFile(str(path)) as handle:
            declared, extra_info = handle.frames, handle.extra_info
            frame_bytes = _BYTES_PER_SAMPLE.get(handle.subtype, 0) * handle.channels
            data = handle.read(dtype="float32", always_2d=True)
            rate = handle.samplerate
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        raise _unreadable(path, "audio", exc) from exc
    truncated = _truncation(extra_info, data.shape[0], declared, frame_bytes)
    if truncated:
        raise MediaError(f"{path.name}: {truncated}")
    if data.shape[0] == 0:
        raise MediaError(f"{path.name}: audio has no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise MediaError(f"{path.name}: audio has non-finite samples")
    if not np.any(mono):
        raise MediaError(f"{path.name}: audio is digital silence")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_image(path: Path, strict: bool = False):
    """An RGB PIL image detached from its file; strict also rejects single-colour images."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, "image", exc) from exc
    if rgb.width == 0 or rgb.height == 0:
        raise MediaError(f"{path.name}: image has no pixels")
    if strict and all(low == high for low, high in rgb.getextrema()):
        raise MediaError(f"{path.name}: image is a single colour")
    return rgb


def load_media(record: Record, strict: bool = False) -> Sample:
    """The record with its audio or image loaded; MediaError (short reason) when unusable.

    Missing, empty, truncated or undecodable files and digitally silent audio always raise.
    `strict` additionally rejects a single-colour image.
    """
    if record.modality == "audio":
        return Sample(record=record, audio=read_audio(record.path))
    if record.modality == "image":
        return Sample(record=record, image=read_image(record.path, strict))
    raise MediaError(f"{record.id}: unknown modality {record.modality!r}")
