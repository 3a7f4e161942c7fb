"""Shared fixtures: an isolated cache and data root per session, tiny models built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, so each (and every CLI run it starts) keeps to one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny checkpoints and activations for the whole test session (built once, reused)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The user-level cache where provisioned real weights live (smol_speech), as the CLI uses it."""
    return Path(os.environ.get("MCOLLAPSE_CACHE", Path.home() / ".cache" / "mcollapse"))


@pytest.fixture(scope="session")
def env(tmp_path_factory, cache_dir) -> dict:
    """Environment of every CLI run, in a subprocess or in-process: isolated data root and cache, this
    checkout, no hub."""
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path_factory.mktemp("data")
    return {**os.environ, "MCOLLAPSE_DATA": str(data), "MCOLLAPSE_CACHE": str(cache_dir),
            "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
