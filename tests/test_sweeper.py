"""The staged sweeper and the launcher presets: planning and composition only, no model runs."""

from __future__ import annotations

from collections import Counter

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import OmegaConf

from hydra_plugins.mcollapse_sweeper.staged_sweeper import cell_overrides
from mcollapse.cli import config_dir
from mcollapse.config import register
from tests.helpers import mcollapse

register()

SPEECH, VISION = ("ultravox", "qwen2audio"), ("llava", "prismatic_dinov2", "prismatic_siglip")


def test_cell_overrides_writes_sweeps_nulls_and_bools():
    cell = {"model": ["a", "b"], "dataset.max_samples": None, "strict": True, "flag": False, "seed": 42,
            "experiment.ms_k": "[1,2]", "both": [True, None]}
    assert cell_overrides(cell) == ["model=a,b", "dataset.max_samples=null", "strict=true", "flag=false", "seed=42",
                                    "experiment.ms_k=[1,2]", "both=true,null"]
    assert cell_overrides(OmegaConf.create(cell)) == cell_overrides(cell)


def _plan(preset: str, arguments=(), validate=False):
    """Instantiate the sweeper as `mcollapse -m +sweep=<preset> ...` does and plan its jobs."""
    task = [f"+sweep={preset}", *arguments]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={preset}"], return_hydra_config=True)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks())
        sweeper = Plugins.instance().instantiate_sweeper(hydra_context=context, task_function=lambda _: None,
                                                         config=cfg)
        planned = [(name, [dict(o.split("=", 1) for o in job) for job in jobs]) for name, jobs in sweeper.plan(task)]
        if validate:  # the jobs compose, as the sweeper checks before it launches a batch
            sweeper.validate_batch_is_legal([[f"{k}={v}" for k, v in job.items()] for job in _representatives(planned)])
    return planned


def _representatives(planned):
    """One job per model and one per combination of all other overrides: what could fail to compose."""
    picked, seen = [], set()
    for _, jobs in planned:
        for job in jobs:
            marks = {job.get("model"), tuple(sorted((k, v) for k, v in job.items() if k != "model"))}
            if not marks <= seen:
                picked.append(job)
                seen |= marks
    return picked


def _keys(job, *keys):
    return tuple(job.get(k) for k in keys)


@pytest.mark.parametrize("preset", ["paper_tiny", "paper"])
def test_stages_extract_every_pair_before_it_is_used(preset):
    planned = _plan(preset, validate=True)
    assert [name for name, _ in planned] == ["extract", "measure", "intervene"]
    extracted = {_keys(job, "model", "dataset") for job in planned[0][1]}
    assert {job["experiment"] for job in planned[0][1]} == {"extract"}
    later = [job for _, jobs in planned[1:] for job in jobs]
    assert {_keys(job, "model", "dataset") for job in later} <= extracted
    everything = [tuple(sorted(job.items())) for _, jobs in planned for job in jobs]
    assert len(everything) == len(set(everything))
    for job in (job for _, jobs in planned for job in jobs):
        assert job["+sweep"] == preset  # the command line's overrides reach every job


def test_every_job_of_a_pair_takes_the_same_selection():
    for preset in ("paper_tiny", "paper"):
        selections = {}
        for _, jobs in _plan(preset):
            for job in jobs:
                selection = {k: v for k, v in job.items() if k.startswith("dataset.")}
                selections.setdefault(_keys(job, "model", "dataset"), []).append(selection)
        for pair, seen in selections.items():
            assert all(s == seen[0] for s in seen), (preset, pair)


def test_command_line_sweeps_multiply_every_cell():
    single = _plan("paper_tiny")
    double = _plan("paper_tiny", ["seed=42,43", "device=cpu"])
    for (name, one), (_, two) in zip(single, double):
        assert len(two) == 2 * len(one), name
        assert Counter(job["seed"] for job in two) == {"42": len(one), "43": len(one)}
        assert all(job["device"] == "cpu" for job in two)


def test_paper_grid_has_the_papers_jobs():
    planned = dict(_plan("paper"))
    extract, measure, intervene = planned["extract"], planned["measure"], planned["intervene"]
    pairs = {(m, d) for m in SPEECH for d in ("librispeech", "cremad", "esc50")} | {(m, "coco") for m in VISION}
    assert {_keys(job, "model", "dataset") for job in extract} == pairs
    assert len(extract) == len(pairs)

    def runs(jobs, experiment, **extra):
        return {_keys(job, "model", "dataset") for job in jobs
                if job["experiment"] == experiment and all(job.get(k) == v for k, v in extra.items())}

    assert runs(measure, "probe") == pairs
    assert runs(measure, "lipschitz") == pairs
    assert runs(measure, "lipschitz", target="reference") == pairs  # the settings of the published numbers
    assert runs(measure, "lipschitz", target="content") == pairs - {(m, "esc50") for m in SPEECH}  # no transcripts
    assert runs(measure, "probe", probe="reference") == runs(measure, "probe", probe="default") == pairs
    main_pairs = {(m, "librispeech") for m in SPEECH} | {(m, "coco") for m in VISION}
    assert runs(measure, "modes") == main_pairs
    assert runs(intervene, "wasserstein") == main_pairs
    assert runs(intervene, "ablation", target="reference") == main_pairs
    assert runs(intervene, "ablation", target="content") == main_pairs
    assert ("prismatic_dinov2", "coco") in runs(intervene, "ablation", target="reference")
    assert runs(intervene, "gradproj") == runs(intervene, "msswap") == {("ultravox", "librispeech")}
    assert runs(intervene, "lora", lora="paper") == {("ultravox", "cremad")}
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=paper"])
    assert cfg.threads == "auto" and not cfg.model.small  # auto: torch's default for the real models


@pytest.mark.parametrize("launcher,target,gpus,timeout", [
    ("slurm_gpu", "SlurmLauncher", 1, 720),
    ("slurm_cpu", "SlurmLauncher", 0, 240),
    ("local_parallel", "LocalLauncher", 0, 120),
])
def test_launcher_presets_compose_and_take_overrides(launcher, target, gpus, timeout, tmp_path, env):
    args = ["--cfg", "hydra", "--package", "hydra.launcher", f"hydra/launcher={launcher}",
            "hydra.launcher.mem_gb=100"]
    slurm = launcher.startswith("slurm")
    if slurm:
        args.append("hydra.launcher.partition=gpu")
    conf = OmegaConf.create(mcollapse(args, tmp_path, env).stdout)  # the node alone
    assert conf._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert (conf.gpus_per_node, conf.timeout_min, conf.mem_gb) == (gpus, timeout, 100)
    if slurm:
        assert conf.partition == "gpu" and conf.cpus_per_task == 8
        assert conf.array_parallelism == 256 and conf.setup is None


def test_paper_preset_composes_on_the_command_line(tmp_path, env):
    out = mcollapse(["--cfg", "hydra", "--package", "hydra.sweeper", "+sweep=paper"], tmp_path, env).stdout
    sweeper = OmegaConf.create(out)
    assert sweeper._target_ == "hydra_plugins.mcollapse_sweeper.staged_sweeper.StagedSweeper"
    assert [stage.name for stage in sweeper.stages] == ["extract", "measure", "intervene"]


def test_organism_grid_measures_each_organism_beside_its_random_twin():
    planned = dict(_plan("organism", validate=True))
    assert list(planned) == ["measure", "intervene"]
    jobs = [job for stage in planned.values() for job in stage]
    by_experiment = {}
    for job in jobs:
        by_experiment.setdefault(job["experiment"], set()).add(job["model"])
    organisms = {"smol_speech", "smol_speech_random", "smol_vision", "smol_vision_random"}
    for experiment in ("probe", "lipschitz", "modes", "wasserstein", "gradproj", "ablation", "msswap", "gmi"):
        assert by_experiment[experiment] == organisms, experiment
    assert by_experiment["lora"] == {"smol_speech"}
    assert {job["dataset"] for job in jobs if job["experiment"] == "gmi" and "speech" in job["model"]} == \
        {"synthetic_librispeech"}


def test_lenses_grid_runs_every_lens_and_composes():
    jobs = [job for _, stage in _plan("lenses", validate=True) for job in stage]
    lenses = {"similarity", "logit_lens", "embedding_map", "skip", "weight_overlap", "transfer", "attribute", "shift"}
    assert {job["experiment"] for job in jobs} == lenses
    assert any("compare" in key for job in jobs for key in job)  # trained and random IMA in one figure
