"""Process-wide run settings: seeds, threads, memory between sweep jobs."""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """One place that sets every RNG so runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def thread_count(threads, small_model: bool) -> int | None:
    """`threads=auto`: one thread for the small twins, whose tiny matmuls lose most of their time to
    thread synchronisation (a LoRA run took 4x longer on torch's default), torch's default for the
    rest; null: torch's default; N: N."""
    if threads == "auto":
        return 1 if small_model else None
    return threads


def set_threads(threads, small_model: bool) -> int:
    """Apply the thread setting; returns the count torch now uses (meta.json records it)."""
    count = thread_count(threads, small_model)
    if count:
        torch.set_num_threads(count)
    return torch.get_num_threads()


def release_memory() -> None:
    """Give model and GPU memory back before the next job of a sweep starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
