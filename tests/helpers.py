"""Small builders shared by tests: model configs and in-memory samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mcollapse.cli import config_dir
from mcollapse.config import ModelConfig
from mcollapse.data.base import Record, Sample


def model_cfg(name: str, **overrides):
    loaded = OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml")
    loaded.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def audio_samples(seconds: list[float], seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i, length in enumerate(seconds):
        t = np.arange(int(16_000 * length)) / 16_000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        record = Record(id=f"a{i}", path=Path(f"a{i}.wav"), modality="audio", text=f"sample number {i}")
        out.append(Sample(record, audio=wave.astype(np.float32)))
    return out


def image_samples(n: int, seed: int = 0) -> list[Sample]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
        record = Record(id=f"i{i}", path=Path(f"i{i}.jpg"), modality="image", text=f"a picture {i}")
        out.append(Sample(record, image=Image.fromarray(pixels)))
    return out


def mcollapse(args, cwd, env, check=True, timeout=600):
    """Run the CLI in a subprocess; a failure shows the tail of its output."""
    proc = subprocess.run([sys.executable, "-m", "mcollapse", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]
