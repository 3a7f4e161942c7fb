"""load_media returns model-ready audio/images and one short MediaError for unusable files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mcollapse.data import SAMPLE_RATE, Record, load_media
from mcollapse.errors import MediaError


def audio_record(path):
    return Record(id=path.stem, path=path, modality="audio")


def image_record(path):
    return Record(id=path.stem, path=path, modality="image")


def test_stereo_44k_becomes_mono_16k_float32(tmp_path):
    path = tmp_path / "clip.wav"
    t = np.arange(44_100) / 44_100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(path, np.stack([tone, tone], axis=1), 44_100)
    sample = load_media(audio_record(path))
    assert sample.audio.dtype == np.float32 and sample.audio.ndim == 1
    assert abs(sample.audio.size - SAMPLE_RATE) <= 1
    assert 0.45 < np.abs(sample.audio).max() < 0.55
    assert sample.id == "clip" and sample.image is None


def test_flac_at_16k_is_read_unchanged(tmp_path):
    path = tmp_path / "clip.flac"
    data = (0.25 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    sf.write(path, data, SAMPLE_RATE, format="FLAC")
    audio = load_media(audio_record(path)).audio
    np.testing.assert_allclose(audio, data, atol=1e-4)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"RIFF\x00\x00garbage that is not a wave file", "unreadable audio"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
    ],
)
def test_unusable_audio_raises_media_error(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=reason) as error:
        load_media(audio_record(path))
    assert str(error.value).startswith("bad.wav:") and "\n" not in str(error.value)


def test_missing_audio_file(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        load_media(audio_record(tmp_path / "gone.wav"))


def test_wav_with_zero_frames(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(MediaError, match="no samples"):
        load_media(audio_record(path))


def test_digital_silence_is_unusable_even_when_lenient(tmp_path):
    """A silent clip carries nothing to probe; it is skipped and counted, never used."""
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    for strict in (False, True):
        with pytest.raises(MediaError, match="silent.wav: audio is digital silence"):
            load_media(audio_record(path), strict=strict)


def test_wav_with_truncated_data_section(tmp_path):
    """The header promises more frames than the file holds: a cut download, not a shorter clip."""
    path = tmp_path / "cut.wav"
    sf.write(path, (0.3 * np.sin(np.arange(16_000) / 10)).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MediaError, match=r"cut.wav: truncated: the header promises 16000 frames, the file holds 79"):
        load_media(audio_record(path))


def test_wav_with_trailing_bytes_is_read(tmp_path):
    path = tmp_path / "tail.wav"
    data = (0.3 * np.sin(np.arange(1600) / 10)).astype(np.float32)
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    path.write_bytes(path.read_bytes() + b"\x00" * 64)
    np.testing.assert_array_equal(load_media(audio_record(path)).audio, data)


def test_image_is_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").save(path)
    image = load_media(image_record(path)).image
    assert image.mode == "RGB" and image.size == (8, 8)


def test_truncated_and_corrupt_images(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        good
    )
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(MediaError, match=path.name):
            load_media(image_record(path))


def test_strict_rejects_single_colour_image(tmp_path):
    path = tmp_path / "flat.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
    assert load_media(image_record(path)).image.size == (16, 16)
    with pytest.raises(MediaError, match="single colour"):
        load_media(image_record(path), strict=True)
