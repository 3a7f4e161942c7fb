"""The runnable experiments, one module each exposing run(cfg, run_dir), named in one registry.

Shared steps live outside this package (mcollapse.pipeline, mcollapse.models), so a name given on
the command line reaches only an experiment.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mcollapse.errors import UserError

EXPERIMENTS = {
    name: f"mcollapse.experiments.{name}"
    for name in ("ablation", "cache", "extract", "gmi", "gradproj", "lipschitz", "lora", "modes", "msswap", "probe",
                 "report", "shift", "skip", "train_adapter", "verify", "wasserstein", "weight_overlap", "similarity",
                 "logit_lens", "embedding_map", "transfer", "attribute")
}


def experiment_module(name: str) -> ModuleType:
    """The module whose run(cfg, run_dir) carries out experiment `name`; imported only when asked for."""
    if name not in EXPERIMENTS:
        raise UserError(f"experiment '{name}' is unknown (known: {', '.join(EXPERIMENTS)})")
    return importlib.import_module(EXPERIMENTS[name])
