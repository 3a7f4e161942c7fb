"""The configs travel inside the wheel, so a non-editable install finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_configs_and_runs_from_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("mcollapse-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in ("config.yaml", "model/smol_speech.yaml", "dataset/librispeech.yaml", "experiment/probe.yaml",
                 "sweep/paper_tiny.yaml", "sweep/paper.yaml", "hydra/launcher/slurm_gpu.yaml"):
        assert f"mcollapse/conf/{conf}" in names, conf
    # the sweeper plugin, in the namespace package Hydra searches (which other plugins share)
    assert "hydra_plugins/mcollapse_sweeper/staged_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import mcollapse.cli as c; print(c.__file__); print(c.config_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == str(site / "mcollapse" / "conf")
    job = subprocess.run([sys.executable, "-m", "mcollapse", "--cfg", "job", "model=qwen2audio"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "Qwen/Qwen2-Audio-7B-Instruct" in job
    code = "import hydra_plugins.mcollapse_sweeper.staged_sweeper as s; print(s.__file__)"
    plugin = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert plugin.startswith(str(site)), plugin
    hydra = subprocess.run([sys.executable, "-m", "mcollapse", "--cfg", "hydra", "+sweep=paper_tiny"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert "_target_: hydra_plugins.mcollapse_sweeper.staged_sweeper.StagedSweeper" in hydra
