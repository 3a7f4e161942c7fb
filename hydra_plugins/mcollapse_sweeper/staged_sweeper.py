"""A sweeper that runs a grid in stages: every job of a stage has ended before the next stage starts.

The paper's grid is not one cartesian product (speech models take speech datasets, vision models COCO)
and its experiments build on each other (extraction first; L x W1 reads the Lipschitz summary; ablation
and swaps reuse the modes' eigenbasis), so a preset lists stages of cells, each cell a small product of
override values. Sweep overrides given on the command line multiply every cell (e.g. `seed=42,43`).
Within a stage, `max_batch_size` caps how many jobs the launcher runs at once.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class StagedSweeperConf:
    _target_: str = "hydra_plugins.mcollapse_sweeper.staged_sweeper.StagedSweeper"
    max_batch_size: Optional[int] = None  # jobs launched at once (null: a whole stage)
    params: Optional[Dict[str, str]] = None  # applied to every job, like the basic sweeper's
    stages: List[Any] = field(default_factory=list)  # [{name, cells: [{key: "v1,v2", ...}, ...]}, ...]


ConfigStore.instance().store(group="hydra/sweeper", name="staged", node=StagedSweeperConf, provider="mcollapse")


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def cell_overrides(cell) -> List[str]:
    """`{model: [a, b], seed: 42}` -> ["model=a,b", "seed=42"]: a list is a sweep over its items
    (a list-valued setting is written as a string: `experiment.ms_k: "[1,2]"`)."""
    out = []
    for key, value in cell.items():
        if isinstance(value, (list, tuple, ListConfig)):
            out.append(f"{key}={','.join(_value(v) for v in value)}")
        else:
            out.append(f"{key}={_value(value)}")
    return out


class StagedSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 stages: Optional[List[Any]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.stages = stages or []
        self.stage_names: List[str] = []

    def plan(self, arguments: List[str]) -> List[Tuple[str, List[List[str]]]]:
        """Each stage's jobs (lists of overrides), in order, duplicates dropped."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        planned = []
        for number, stage in enumerate(self.stages):
            if not isinstance(stage, (dict, DictConfig)) or "cells" not in stage:
                raise ValueError(f"sweeper stage {number} needs a 'cells' list")
            name = str(stage.get("name") or f"stage{number}")
            jobs: List[List[str]] = []
            for cell in stage["cells"]:
                overrides = parser.parse_overrides([*self._parse_config(), *cell_overrides(cell), *arguments])
                for job in self.split_arguments(overrides, None)[0]:
                    if job not in jobs:
                        jobs.append(job)
            planned.append((name, jobs))
        return planned

    def sweep(self, arguments: List[str]) -> Any:
        if not self.stages:
            return super().sweep(arguments)
        assert self.config is not None and self.launcher is not None
        batches, names = [], []
        for name, jobs in self.plan(arguments):
            for chunk in self.split_overrides_to_chunks(jobs, self.max_batch_size):
                batches.append(chunk)
                names.append(name)
            log.info("stage %s: %d job(s)", name, len(jobs))
        self.overrides, self.stage_names = batches, names
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: List[Sequence[JobReturn]] = []
        first_job = 0
        while not self.is_done():
            name = self.stage_names[self.batch_index]
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            started = time.perf_counter()
            log.info("stage %s: launching %d job(s)", name, len(batch))
            results = self.launcher.launch(batch, initial_job_idx=first_job)
            for result in results:
                _ = result.return_value  # re-raises a job's exception, as the basic sweeper does
            log.info("stage %s: %d job(s) done in %.1f s", name, len(batch), time.perf_counter() - started)
            first_job += len(batch)
            returns.append(results)
        return returns
