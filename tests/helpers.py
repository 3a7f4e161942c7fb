"""Small builders shared by tests: model configs, in-memory samples, and runs of the CLI's jobs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import soundfile
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from mcollapse.cli import config_dir, run_job
from mcollapse.config import ModelConfig
from mcollapse.data.base import Record, Sample
from mcollapse.errors import UserError
from mcollapse.runtime import release_memory


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


def wav_records(directory: Path, seconds: list[float], seed: int = 0) -> list[Record]:
    """audio_samples written as 16 kHz wav files in `directory`, as the records a loader yields."""
    out = []
    for sample in audio_samples(seconds, seed):
        path = Path(directory) / f"{sample.id}.wav"
        soundfile.write(path, sample.audio, 16_000)
        out.append(Record(id=sample.id, path=path, modality="audio", text=sample.record.text))
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


@dataclass
class Outcome:
    """What a job ended with: the CLI's exit status and the message of its one error line."""

    exit_code: int
    error: str = ""


def run_experiment(overrides: list[str], cwd: Path, env: dict, check: bool = True) -> Outcome:
    """Run one CLI job in this process: the config composed by Hydra's compose API from the same
    overrides (with threads=1), the run dir where `mcollapse` puts it under cwd, the environment the
    CLI would get. Saves starting an interpreter and importing torch and transformers per run; the
    CLI itself (logging, exit statuses, sweeps) is tested through real processes in test_cli.py."""
    threads = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ, env, clear=True), contextlib.chdir(cwd):
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                cfg = compose(config_name="config", overrides=["threads=1", *overrides], return_hydra_config=True)
            run_dir = Path(cwd) / cfg.hydra.run.dir
            with open_dict(cfg):
                del cfg["hydra"]
            # as Hydra does (two runs in one second share the dir): report and verify read the composed config
            (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            run_job(cfg, run_dir)
    except UserError as err:
        if check:
            raise
        return Outcome(err.exit_code, str(err))
    finally:
        torch.set_num_threads(threads)
        release_memory()
    return Outcome(0)


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def cremad_copy_with_a_corrupt_clip(tmp_path: Path, env, n: int, small_speech) -> tuple[Path, list[Path]]:
    """The first n clips of the synthetic CREMA-D part copied to tmp_path/data, the fourth replaced
    by bytes no reader accepts: (the copy's AudioWAV dir, the source clips)."""
    run_experiment(["experiment=extract", "model=tiny_qwen2audio", "dataset=synthetic_speech", *small_speech,
                    "experiment.text.source=none"], tmp_path, env)  # makes sure the synthetic set exists
    source = Path(env["MCOLLAPSE_DATA"]) / "synthetic_speech" / "CREMA-D" / "AudioWAV"
    clips = sorted(source.glob("*.wav"))[:n]
    target = tmp_path / "data" / "CREMA-D" / "AudioWAV"
    target.mkdir(parents=True)
    for clip in clips:
        (target / clip.name).write_bytes(clip.read_bytes())
    (target / clips[3].name).write_bytes(b"RIFF not really a wave file")
    return target, clips
