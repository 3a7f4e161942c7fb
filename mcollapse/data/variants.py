"""Controlled variants of each item: one perceptual attribute changed by a known factor.

Images (PIL): brightness, saturation and contrast through `ImageEnhance` (factor 1: unchanged),
red-channel scaling (the R channel times the factor, clipped), Gaussian blur (radius in pixels)
and rotation (degrees, the canvas kept). Audio (librosa, 16 kHz mono): pitch shift (semitones),
time stretch (rate; > 1 is faster) and gain (dB; the result clipped to [-1, 1]).

A variant is a `Record` whose id is `<base id>~<attribute>=<factor>`, with `base_id`, `attribute`
and `factor` in its fields; the base item's text and label fields are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

from mcollapse.data.base import Record
from mcollapse.data.media import load_media
from mcollapse.errors import MediaError, UserError

VERSION = 1
SAMPLE_RATE = 16_000

IMAGE_FACTORS = {
    "brightness": [0.4, 0.7, 1.0, 1.4, 1.8],
    "red": [0.4, 0.7, 1.0, 1.3, 1.6],
    "saturation": [0.0, 0.5, 1.0, 1.5, 2.0],
    "contrast": [0.4, 0.7, 1.0, 1.4, 1.8],
    "blur": [0.0, 1.0, 2.0, 3.0, 4.0],
    "rotation": [0.0, 15.0, 30.0, 45.0, 60.0],
}
AUDIO_FACTORS = {
    "pitch": [-4.0, -2.0, 0.0, 2.0, 4.0],
    "stretch": [0.8, 0.9, 1.0, 1.12, 1.25],
    "gain": [-18.0, -12.0, -6.0, 0.0, 6.0],
}
NEUTRAL = {"brightness": 1.0, "red": 1.0, "saturation": 1.0, "contrast": 1.0, "blur": 0.0, "rotation": 0.0,
           "pitch": 0.0, "stretch": 1.0, "gain": 0.0}


def default_factors(modality: str) -> dict[str, list[float]]:
    if modality == "image":
        return dict(IMAGE_FACTORS)
    if modality == "audio":
        return dict(AUDIO_FACTORS)
    raise UserError(f"no attribute variants for modality '{modality}'")


def transform_image(image, attribute: str, factor: float):
    from PIL import ImageEnhance, ImageFilter

    image = image.convert("RGB")
    if attribute == "brightness":
        return ImageEnhance.Brightness(image).enhance(factor)
    if attribute == "saturation":
        return ImageEnhance.Color(image).enhance(factor)
    if attribute == "contrast":
        return ImageEnhance.Contrast(image).enhance(factor)
    if attribute == "red":
        from PIL import Image

        pixels = np.asarray(image).astype(np.float32)
        pixels[..., 0] = np.clip(pixels[..., 0] * factor, 0, 255)
        return Image.fromarray(pixels.round().astype(np.uint8))
    if attribute == "blur":
        return image if factor == 0 else image.filter(ImageFilter.GaussianBlur(radius=factor))
    if attribute == "rotation":
        return image.rotate(factor, resample=3)  # bicubic, same canvas
    raise UserError(f"unknown image attribute '{attribute}' (known: {', '.join(IMAGE_FACTORS)})")


def transform_audio(wave: np.ndarray, attribute: str, factor: float) -> np.ndarray:
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if attribute == "pitch":
        out = wave if factor == 0 else librosa.effects.pitch_shift(wave, sr=SAMPLE_RATE, n_steps=factor)
    elif attribute == "stretch":
        out = wave if factor == 1 else librosa.effects.time_stretch(wave, rate=factor)
    elif attribute == "gain":
        out = wave * float(librosa.db_to_amplitude(factor))
    else:
        raise UserError(f"unknown audio attribute '{attribute}' (known: {', '.join(AUDIO_FACTORS)})")
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def variant_id(base: str, attribute: str, factor: float) -> str:
    return f"{base}~{attribute}={factor:g}"


def variant_records(records: list[Record], plan: dict[str, list[float]], root: Path) -> list[Record]:
    """The variant records of `records` under `plan` (attribute -> factors), media in `root`."""
    out = []
    for record in records:
        suffix = ".wav" if record.modality == "audio" else ".png"
        for attribute, factors in plan.items():
            for factor in factors:
                vid = variant_id(record.id, attribute, float(factor))
                name = vid.replace("/", "_").replace("~", "__").replace("=", "_") + suffix
                fields = {**record.fields, "base_id": record.id, "attribute": attribute, "factor": float(factor)}
                out.append(Record(vid, Path(root) / name, record.modality, record.text, fields))
    return out


def write_variants(records: list[Record], plan: dict[str, list[float]], staging: Path) -> dict[str, str]:
    """Write every variant's media into `staging` (a directory being built); returns the base items
    that could not be read, with the reason (their variants are absent)."""
    staging = Path(staging)
    unreadable = {}
    for record in records:
        try:
            sample = load_media(record)
        except MediaError as err:
            unreadable[record.id] = str(err)
            continue
        for variant in variant_records([record], plan, staging):
            attribute, factor = variant.fields["attribute"], variant.fields["factor"]
            if record.modality == "audio":
                soundfile.write(str(variant.path), transform_audio(sample.audio, attribute, factor), SAMPLE_RATE)
            else:
                transform_image(sample.image, attribute, factor).save(variant.path)
    (staging / "unreadable.json").write_text(json.dumps(unreadable, indent=1))
    return unreadable
