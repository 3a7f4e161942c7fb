"""A generated read-speech corpus in the real LibriSpeech layout, for training a speech adapter.

`out_dir` plays the role of `LibriSpeech/`: the splits `train-clean-100`, `dev-clean` and
`test-clean` each hold `<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` (16 kHz mono FLAC)
with `<speaker>-<chapter>.trans.txt` beside them (upper case, apostrophes kept, no other
punctuation), so the ordinary `librispeech` loader reads every split. `SPEAKERS.TXT` is in the
LibriSpeech format and `SOURCE.json` records where the text came from.

Text: sentences from the Debian package `fortunes` (/usr/share/games/fortunes): a real English
text source (quotations from literature, people and proverbs) that installs from the package
registry like espeak-ng does; PyPI carries no bundled English prose corpus (NLTK's corpora are
downloaded from elsewhere). Entries are split into sentences and filtered (plain words only, a
length window), deduplicated on the transcript, sorted, then shuffled with the seed.

Speakers: an espeak-ng voice (an English accent with a voice variant, a fixed list below) with
its own seeded base pitch and speed, plus small per-utterance jitter. The splits are disjoint by
speaker and by sentence; each sentence of a split is spoken by `utterances_per_sentence`
different speakers of that split, balanced across them. Every clip is at most `max_seconds`
long: a longer synthesis is redone faster until it fits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.data.espeak import espeak_binary, synthesize
from mcollapse.errors import UserError

VERSION = 1
SUBDIRS = ("train-clean-100", "dev-clean", "test-clean")
SPLIT_KEYS = ("train", "dev", "test")  # option suffixes, in SUBDIRS order
DEFAULT_OPTIONS = {
    "n_train_speakers": 36,
    "n_dev_speakers": 6,
    "n_test_speakers": 6,
    "n_train_sentences": 1600,
    "n_dev_sentences": 150,
    "n_test_sentences": 250,
    "utterances_per_sentence": 2,
    "min_words": 4,
    "max_words": 10,
    "max_seconds": 4.8,
    "seed": 0,
}

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_PACKAGE = "fortunes"
CHAPTER_SIZE = 50  # utterances per chapter at most

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# espeak-ng voice variants (files under espeak-ng-data/voices/!v) that stay intelligible; the
# whispering, robotic, croaking and novelty ones are left out. Sex as espeak-ng lists it.
VARIANTS = (
    ("m1", "M"), ("f1", "F"), ("m2", "M"), ("f2", "F"), ("m3", "M"), ("f3", "F"),
    ("m4", "M"), ("f4", "F"), ("m5", "M"), ("f5", "F"), ("m6", "M"), ("Annie", "F"),
    ("m7", "M"), ("Alicia", "F"), ("adam", "M"), ("Andrea", "F"), ("Alex", "M"), ("linda", "F"),
    ("Andy", "M"), ("steph", "F"), ("benjamin", "M"), ("belinda", "F"), ("david", "M"),
    ("anika", "F"), ("john", "M"), ("paul", "M"), ("robert", "M"), ("max", "M"),
)  # fmt: skip
# 56 voices: each variant with two accents, a different pair for neighbouring variants.
VOICES = tuple(
    (f"{ACCENTS[(i + shift) % len(ACCENTS)]}+{variant}", sex)
    for shift in (0, 3)
    for i, (variant, sex) in enumerate(VARIANTS)
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = re.compile(r"^[A-Za-z' ,;]+$")
_WORD = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)*$")
_URL = re.compile(r"www|https?|\.com\b", re.IGNORECASE)
# A sentence split after one of these is a fragment ("... said Mr." / "Smith ...").
_ABBREVIATIONS = {"MR", "MRS", "MS", "DR", "ST", "VS", "JR", "SR", "PROF", "REV", "GEN", "COL", "LT",
                  "CAPT", "SGT", "ETC", "NO", "VOL", "CF", "EG", "IE"}


def _entries(path: Path) -> list[list[str]]:
    """The fortune entries of one file (lines between lines holding only `%`)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append(current)
            current = []
        else:
            current.append(line)
    entries.append(current)
    return [entry for entry in entries if any(line.strip() for line in entry)]


def transcript(sentence: str) -> str | None:
    """The LibriSpeech-style transcript of one sentence, or None when it does not qualify."""
    body = sentence.strip().rstrip(".!?").strip()
    if not body or not _ALLOWED.match(body) or _URL.search(body):
        return None
    words = [word.strip(",;") for word in body.split()]
    if not all(_WORD.match(word) for word in words):
        return None
    if any(word.isupper() and len(word) > 1 for word in words):  # acronyms, shouting
        return None
    if words[-1].upper() in _ABBREVIATIONS:
        return None
    return " ".join(words).upper()


def source_files(root: Path = FORTUNES_DIR) -> list[Path]:
    """The fortune text files (not the `.dat` indexes nor the `.u8` links), or a UserError."""
    files = []
    if root.is_dir():
        files = sorted(p for p in root.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise UserError("the synthetic_librispeech dataset needs the fortunes text: "
                        "install it (apt-get install fortunes)")
    return files


def extract_sentences(files: list[Path], min_words: int, max_words: int) -> list[str]:
    """Sorted distinct transcripts of `min_words..max_words` words from the fortune files."""
    found = set()
    for path in files:
        for entry in _entries(path):
            lines = [line.strip() for line in entry]
            joined = " ".join(line for line in lines if line and not line.startswith("--"))
            for sentence in _SENTENCE_END.split(joined):
                if not sentence.strip().endswith((".", "!", "?")):
                    continue
                text = transcript(sentence)
                if text is not None and min_words <= len(text.split()) <= max_words:
                    found.add(text)
    return sorted(found)


def _package_version() -> str | None:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", FORTUNES_PACKAGE],
                                check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _check(options: dict) -> None:
    speakers = [options[f"n_{key}_speakers"] for key in SPLIT_KEYS]
    sentences = [options[f"n_{key}_sentences"] for key in SPLIT_KEYS]
    per_sentence = options["utterances_per_sentence"]
    if min(speakers) < 1 or sum(speakers) > len(VOICES):
        raise UserError(f"synthetic_librispeech needs 1+ speakers per split and at most {len(VOICES)} "
                        f"in all (one espeak-ng voice each), got {sum(speakers)}")
    if min(sentences) < 1:
        raise UserError("synthetic_librispeech needs at least one sentence per split")
    if not 1 <= per_sentence <= min(speakers):
        raise UserError(f"utterances_per_sentence must be 1..{min(speakers)} "
                        "(each sentence is said by different speakers of its split)")
    if not 1 <= options["min_words"] <= options["max_words"]:
        raise UserError("min_words and max_words must satisfy 1 <= min_words <= max_words")
    if not 1.0 <= options["max_seconds"] <= 30.0:
        raise UserError("max_seconds must be within 1..30")
    busiest = max(-(-n * per_sentence // s) for n, s in zip(sentences, speakers))
    if busiest > 100 * CHAPTER_SIZE:  # chapter ids are <speaker>00..<speaker>99
        raise UserError(f"too many utterances per speaker ({busiest}, at most {100 * CHAPTER_SIZE})")


def plan(options: dict, sentences: list[str]) -> list[dict]:
    """Every clip (split, ids, voice, prosody, text), all randomness drawn here in a fixed order."""
    need = sum(options[f"n_{key}_sentences"] for key in SPLIT_KEYS)
    if need > len(sentences):
        raise UserError(
            f"the fortunes text gives {len(sentences)} sentences of {options['min_words']}.."
            f"{options['max_words']} words, fewer than the {need} requested"
        )
    rng = np.random.default_rng([options["seed"], 0])
    order = rng.permutation(len(sentences))
    voice_order = rng.permutation(len(VOICES))
    clips, first_sentence, first_voice = [], 0, 0
    for subdir, key in zip(SUBDIRS, SPLIT_KEYS):
        n_speakers, n_sentences = options[f"n_{key}_speakers"], options[f"n_{key}_sentences"]
        speakers = []
        for k in range(n_speakers):
            voice, sex = VOICES[voice_order[first_voice + k]]
            speakers.append({"id": 100 + first_voice + k, "voice": voice, "sex": sex,
                             "pitch": float(rng.uniform(35, 65)), "speed": float(rng.uniform(150, 185))})
        speaker_order = rng.permutation(n_speakers)
        by_speaker = defaultdict(list)
        for i in range(n_sentences):
            text = sentences[order[first_sentence + i]]
            for j in range(options["utterances_per_sentence"]):
                # consecutive slots of a repeating speaker order: distinct speakers, balanced counts
                by_speaker[int(speaker_order[(i * options["utterances_per_sentence"] + j) % n_speakers])].append(text)
        for k, speaker in enumerate(speakers):
            for u, text in enumerate(by_speaker[k]):
                chapter = speaker["id"] * 100 + u // CHAPTER_SIZE
                clips.append({
                    "split": subdir, "speaker": speaker["id"], "chapter": chapter,
                    "stem": f"{speaker['id']}-{chapter}-{u % CHAPTER_SIZE:04d}",
                    "voice": speaker["voice"], "sex": speaker["sex"], "text": text,
                    "pitch": int(np.clip(speaker["pitch"] + rng.normal(0, 3), 0, 99)),
                    "speed": int(np.clip(speaker["speed"] + rng.normal(0, 6), 80, 400)),
                })  # fmt: skip
        first_sentence += n_sentences
        first_voice += n_speakers
    return clips


def _speak(binary: str, clip: dict, scratch: Path, out_dir: Path, max_seconds: float) -> float:
    """Synthesise one clip as FLAC, redone faster until it is at most `max_seconds`; its length."""
    import soundfile as sf

    limit = int(max_seconds * SAMPLE_RATE)
    speed = clip["speed"]
    for _ in range(8):
        audio = synthesize(binary, clip["voice"], clip["text"], scratch / f"{clip['stem']}.wav",
                           pitch=clip["pitch"], speed=speed)
        if audio.size <= limit:
            break
        speed = int(np.ceil(speed * audio.size / limit * 1.03))
    else:
        raise UserError(f"espeak-ng could not say {clip['text']!r} within {max_seconds} s")
    path = out_dir / clip["split"] / str(clip["speaker"]) / str(clip["chapter"]) / f"{clip['stem']}.flac"
    sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return audio.size / SAMPLE_RATE


def write(out_dir: Path, options: dict) -> None:
    """Write the three splits, SPEAKERS.TXT and SOURCE.json into `out_dir`."""
    _check(options)
    files = source_files()
    sentences = extract_sentences(files, options["min_words"], options["max_words"])
    clips = plan(options, sentences)
    binary = espeak_binary("synthetic_librispeech")

    transcripts = defaultdict(list)
    for clip in clips:
        chapter_dir = out_dir / clip["split"] / str(clip["speaker"]) / str(clip["chapter"])
        chapter_dir.mkdir(parents=True, exist_ok=True)
        transcripts[chapter_dir / f"{clip['speaker']}-{clip['chapter']}.trans.txt"].append(
            f"{clip['stem']} {clip['text']}")
    for path, lines in transcripts.items():
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    scratch = out_dir / ".espeak"
    scratch.mkdir()
    workers = max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_speak, binary, c, scratch, out_dir, options["max_seconds"]) for c in clips]
        try:
            seconds = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure
            raise
    scratch.rmdir()

    minutes = defaultdict(float)
    speakers = {}
    for clip, length in zip(clips, seconds):
        minutes[clip["speaker"]] += length / 60
        speakers[clip["speaker"]] = clip
    lines = ["; Generated by synthetic_librispeech (espeak-ng voices), in the LibriSpeech format",
             ";ID  |SEX| SUBSET           |MINUTES| NAME"]
    for speaker_id, clip in sorted(speakers.items()):
        lines.append(f"{speaker_id:<5}| {clip['sex']} | {clip['split']:<17}| {minutes[speaker_id]:5.2f} | "
                     f"{clip['voice']}")
    (out_dir / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n", encoding="utf-8")

    used = sorted({clip["text"] for clip in clips})
    source = {
        "package": FORTUNES_PACKAGE,
        "version": _package_version(),
        "files": [p.name for p in files],
        "sentences_available": len(sentences),
        "sentences_sha256": hashlib.sha256(("\n".join(sentences) + "\n").encode()).hexdigest(),
        "sentences_used": len(used),
        "utterances": {subdir: sum(c["split"] == subdir for c in clips) for subdir in SUBDIRS},
        "speakers": {subdir: len({c["speaker"] for c in clips if c["split"] == subdir}) for subdir in SUBDIRS},
        "seconds": round(float(sum(seconds)), 2),
    }
    (out_dir / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
