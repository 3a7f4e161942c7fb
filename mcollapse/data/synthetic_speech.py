"""A small offline speech + sound set in the real CREMA-D and ESC-50 layouts.

Speech (`CREMA-D/AudioWAV/<ActorID>_<Code>_<Emotion>_XX.wav`, 16 kHz mono) is synthesised with
espeak-ng: a speaker is an espeak voice variant with its own base pitch and rate; the sentences
are the 12 CREMA-D sentences; an emotion is a prosody offset (pitch, rate, amplitude) plus small
seeded per-clip jitter, so emotion is a distribution and not one constant per file. Every
speaker says every sentence in every emotion (speakers x sentences x emotions clips).

Sounds (`ESC-50/audio/*.wav` + `meta/esc50.csv` with the real columns, 44.1 kHz like the real
set) are seeded numpy signals in a few classes, each with within-class variation in pitch,
timing and level, placed at a random onset in a short clip over faint noise.

Both parts are read back by the ordinary `cremad` and `esc50` loaders.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.data.cremad import SENTENCES
from mcollapse.data.esc50 import META_COLUMNS
from mcollapse.data.espeak import espeak_binary, synthesize
from mcollapse.errors import UserError

VERSION = 1
SUBDIRS = ("CREMA-D", "ESC-50")
DEFAULT_OPTIONS = {
    "n_speakers": 8,
    "n_sentences": 12,
    "emotions": ["NEU", "HAP", "SAD", "ANG"],
    "n_per_class": 16,
    "n_sound_classes": 5,
    "sound_seconds": 2.0,
    "seed": 0,
}

VOICES = (
    "en+m1",
    "en+f2",
    "en-us+m3",
    "en-us+f4",
    "en-gb-scotland+m2",
    "en-gb-x-rp+f3",
    "en-029+m4",
    "en-gb-x-gbclan+f5",
)
VOICE_PITCH_SHIFTS = (0, 14, -14)  # extra speakers reuse the voices at another base pitch
# emotion code -> (pitch offset 0-99 scale, rate offset in words/min, amplitude offset 0-200 scale)
EMOTION_PROSODY = {
    "NEU": (0, 0, 0),
    "HAP": (14, 30, 20),
    "SAD": (-12, -40, -35),
    "ANG": (4, 20, 60),
    "FEA": (22, 45, -15),
    "DIS": (-8, -25, 10),
}
SOUND_CLASSES = ("tone", "chirp", "noise_burst", "click_train", "hum")

SOUND_RATE = 44_100


def _check(options: dict) -> None:
    if not 1 <= options["n_speakers"] <= len(VOICES) * len(VOICE_PITCH_SHIFTS):
        raise UserError(f"n_speakers must be 1..{len(VOICES) * len(VOICE_PITCH_SHIFTS)}")
    if not 1 <= options["n_sentences"] <= len(SENTENCES):
        raise UserError(f"n_sentences must be 1..{len(SENTENCES)}")
    unknown = [e for e in options["emotions"] if e not in EMOTION_PROSODY]
    if unknown or not options["emotions"]:
        raise UserError(f"emotions must be a non-empty subset of {', '.join(EMOTION_PROSODY)}")
    if not 1 <= options["n_sound_classes"] <= len(SOUND_CLASSES):
        raise UserError(f"n_sound_classes must be 1..{len(SOUND_CLASSES)}")
    if options["n_per_class"] < 0 or not 0.5 <= options["sound_seconds"] <= 5.0:
        raise UserError("n_per_class must be >= 0 and sound_seconds within 0.5..5")


def speech_plan(options: dict) -> list[dict]:
    """One espeak call per clip, with all randomness drawn here in a fixed order."""
    rng = np.random.default_rng([options["seed"], 0])
    plan = []
    codes = list(SENTENCES)[: options["n_sentences"]]
    for k in range(options["n_speakers"]):
        voice = VOICES[k % len(VOICES)]
        base_pitch = 50 + VOICE_PITCH_SHIFTS[k // len(VOICES)] + rng.uniform(-8, 8)
        base_speed = 160 + rng.uniform(-15, 15)
        for code in codes:
            for emotion in options["emotions"]:
                d_pitch, d_speed, d_amp = EMOTION_PROSODY[emotion]
                plan.append(
                    {
                        "stem": f"{1001 + k}_{code}_{emotion}_XX",
                        "voice": voice,
                        "text": SENTENCES[code],
                        "pitch": int(np.clip(base_pitch + d_pitch + rng.normal(0, 3), 0, 99)),
                        "speed": int(np.clip(base_speed + d_speed + rng.normal(0, 8), 80, 400)),
                        "amplitude": int(np.clip(100 + d_amp + rng.normal(0, 8), 10, 200)),
                    }
                )
    return plan


def _speak(binary: str, clip: dict, scratch: Path, audio_dir: Path) -> None:
    """Run espeak-ng for one clip and store it as 16 kHz mono 16-bit WAV."""
    import soundfile as sf

    raw = scratch / f"{clip['stem']}.wav"
    audio = synthesize(binary, clip["voice"], clip["text"], raw,
                       pitch=clip["pitch"], speed=clip["speed"], amplitude=clip["amplitude"])
    sf.write(audio_dir / raw.name, audio, SAMPLE_RATE, subtype="PCM_16")


def write_speech(out_dir: Path, options: dict) -> None:
    """CREMA-D layout clips under `out_dir/CREMA-D/AudioWAV`."""
    binary = espeak_binary("synthetic_speech")
    audio_dir = out_dir / "CREMA-D" / "AudioWAV"
    scratch = out_dir / ".espeak"
    audio_dir.mkdir(parents=True)
    scratch.mkdir()
    workers = max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_speak, binary, c, scratch, audio_dir) for c in speech_plan(options)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure
            raise
    scratch.rmdir()


def _sound_event(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """One event of `n` samples at 44.1 kHz, peak 1."""
    t = np.arange(n) / SOUND_RATE
    if kind == "tone":
        f = rng.uniform(300, 1500)
        signal = np.sin(2 * np.pi * f * t) + rng.uniform(0, 0.3) * np.sin(4 * np.pi * f * t)
    elif kind == "chirp":
        f0, f1 = rng.uniform(300, 900), rng.uniform(1800, 5000)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        duration = n / SOUND_RATE
        growth = np.log(f1 / f0) / duration
        signal = np.sin(2 * np.pi * f0 * np.expm1(growth * t) / growth)
    elif kind == "noise_burst":
        gate = np.zeros(n)
        for _ in range(rng.integers(2, 6)):
            length = int(rng.uniform(0.04, 0.2) * SOUND_RATE)
            start = rng.integers(0, max(1, n - length))
            gate[start : start + length] = 1.0
        signal = rng.standard_normal(n) * gate
    elif kind == "click_train":
        rate = rng.uniform(4, 16)
        click_t = np.arange(int(0.003 * SOUND_RATE)) / SOUND_RATE
        click = np.sin(2 * np.pi * rng.uniform(2000, 4000) * click_t) * np.exp(-click_t / 0.0008)
        signal = np.zeros(n)
        for start in np.arange(0, n - click.size, SOUND_RATE / rate).astype(int):
            signal[start : start + click.size] += click
    elif kind == "hum":
        f0 = rng.choice([50.0, 60.0, 100.0, 120.0]) * rng.uniform(0.97, 1.03)
        harmonics = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
        signal = harmonics * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 6) * t))
    else:
        raise ValueError(kind)
    fade = min(n // 2, int(0.01 * SOUND_RATE))
    ramp = np.linspace(0.0, 1.0, fade)
    signal[:fade] *= ramp
    signal[n - fade :] *= ramp[::-1]
    return signal / (np.max(np.abs(signal)) or 1.0)


def sound_clip(kind: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A clip of `seconds` with one event at a random onset over faint noise."""
    n = int(seconds * SOUND_RATE)
    length = int(rng.uniform(0.4, 0.9) * n)
    onset = int(rng.integers(0, n - length + 1))
    clip = 0.003 * rng.standard_normal(n)
    clip[onset : onset + length] += rng.uniform(0.2, 0.7) * _sound_event(kind, rng, length)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def write_sounds(out_dir: Path, options: dict) -> None:
    """ESC-50 layout sounds under `out_dir/ESC-50` (audio/ and meta/esc50.csv)."""
    import soundfile as sf

    audio_dir, meta_dir = out_dir / "ESC-50" / "audio", out_dir / "ESC-50" / "meta"
    audio_dir.mkdir(parents=True)
    meta_dir.mkdir(parents=True)
    rows = []
    for target, kind in enumerate(SOUND_CLASSES[: options["n_sound_classes"]]):
        for i in range(options["n_per_class"]):
            rng = np.random.default_rng([options["seed"], 1, target, i])
            fold, source = i % 5 + 1, 100000 + 1000 * target + i
            filename = f"{fold}-{source}-A-{target}.wav"
            clip = sound_clip(kind, rng, options["sound_seconds"])
            sf.write(audio_dir / filename, clip, SOUND_RATE, subtype="PCM_16")
            rows.append([filename, fold, target, kind, "False", source, "A"])
    with (meta_dir / "esc50.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(META_COLUMNS)
        writer.writerows(rows)


def write(out_dir: Path, options: dict) -> None:
    """Write both parts into `out_dir` (the generator registry handles atomic install)."""
    _check(options)
    write_speech(out_dir, options)
    write_sounds(out_dir, options)
