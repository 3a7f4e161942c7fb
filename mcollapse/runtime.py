"""Process-wide run settings: seeds, threads, memory between sweep jobs."""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, threads: int | None = None) -> None:
    """One place that sets every RNG (and the CPU thread count) so runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if threads:
        torch.set_num_threads(int(threads))


def release_memory() -> None:
    """Give model and GPU memory back before the next job of a sweep starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
