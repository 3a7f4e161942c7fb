"""Config composition through Hydra's compose API: groups, defaults, typed overrides."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mcollapse.cli import config_dir
from mcollapse.config import register

register()


def _compose(overrides=()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def test_default_is_the_embedded_probe():
    cfg = _compose()
    assert (cfg.experiment.name, cfg.model.name, cfg.dataset.name) == ("probe", "smol_speech", "synthetic_speech")
    assert cfg.model.build == "smol_speech"
    assert cfg.hook.llm_layer == 16 and cfg.probe.C == 1.0
    assert list(cfg.probe.seeds) == [42, 43, 44, 45, 46]


@pytest.mark.parametrize(
    "model,family,prompt",
    [("qwen2audio", "qwen2audio", "Describe this audio."), ("llava", "llava", "<image>\nDescribe this image."),
     ("llama", "causal_lm", ""), ("vicuna", "causal_lm", "")],
)
def test_real_model_configs_name_hub_revision_dtype_prompt(model, family, prompt):
    cfg = _compose([f"model={model}"])
    assert cfg.model.family == family and cfg.model.hub_id and cfg.model.revision and cfg.model.dtype
    assert cfg.model.prompt == prompt


def test_every_option_file_has_a_name_matching_its_file():
    from pathlib import Path

    for group in ("model", "dataset", "hook", "experiment", "paths", "probe"):
        for path in (Path(config_dir()) / group).glob("*.yaml"):
            cfg = _compose([f"{group}={path.stem}"])
            assert cfg[group].name == path.stem, path


def test_user_overrides_as_in_the_readme():
    cfg = _compose(["model=llava", "dataset=coco", "probe.C=0.5", "hook.llm_layer=8", "probe=default"])
    assert cfg.probe.C == 0.5 and cfg.hook.llm_layer == 8
    ref = _compose(["probe=reference"])
    assert ref.probe.C is None and ref.probe.weight_decay == 1e-4 and ref.probe.max_iter == 100


def test_typed_override_is_rejected():
    with pytest.raises(ConfigCompositionException):
        _compose(["hook.llm_layer=sixteen"])


def test_unknown_choice_lists_options():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["model=no_such_model"])
    assert "smol_speech" in str(err.value)


def test_paths_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MCOLLAPSE_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("MCOLLAPSE_CACHE", str(tmp_path / "c"))
    cfg = _compose()
    assert cfg.paths.data_root == str(tmp_path / "d")
    assert OmegaConf.to_container(cfg.dataset, resolve=True)["parts"][0]["root"].startswith(str(tmp_path / "d"))


@pytest.mark.parametrize("seed", ["1.5", "foo"])
def test_seed_must_be_an_integer(seed):
    with pytest.raises(ConfigCompositionException, match="seed"):
        _compose([f"seed={seed}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["probe.C=-1"], r"probe.C must be > 0, got -1"),
        (["probe.C=null"], r"set exactly one of probe.C and probe.weight_decay"),
        (["probe.train_size=1.5"], r"probe.train_size must be in \(0, 1\), got 1.5"),
        (["probe.max_iter=0"], r"probe.max_iter must be >= 1, got 0"),
        (["probe.seeds=[]"], r"probe.seeds must not be empty"),
        (["dataset.max_samples=0"], r"dataset.max_samples must be >= 1, got 0"),
        (["model.batch_size=0"], r"model.batch_size must be >= 1, got 0"),
        (["flush_every=0"], r"flush_every must be >= 1, got 0"),
        (["threads=0"], r"threads must be >= 1, got 0"),
        (["device=gpu"], r"device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
        (["experiment=wasserstein", "experiment.n_bootstrap=-1"], r"experiment.n_bootstrap must be >= 0, got -1"),
        (["experiment=gmi", "experiment.n_samples=0"], r"experiment.n_samples must be >= 1, got 0"),
        (["experiment=modes", "modes.ms_threshold=0"], r"modes.ms_threshold must be > 0, got 0"),
        (["modes.n_modes=0"], r"modes.n_modes must be >= 1, got 0"),
        (["modes.rho_normalization=l2"], r"modes.rho_normalization must be one of none, trace, got 'l2'"),
        (["modes.thresholds=[0.5,-1]"], r"modes.thresholds must be > 0, got -1"),
        (["gradients.n_samples=0"], r"gradients.n_samples must be >= 1, got 0"),
        (["threads=many"], r"threads must be >= 1, got many"),
        (["experiment=lipschitz", "experiment.robust_quantile=1.5"],
         r"experiment.robust_quantile must be in \(0, 1\], got 1.5"),
        (["experiment=lora", "experiment.val=0.5", "experiment.test=0.6"],
         r"experiment.val \+ experiment.test must be < 1, got 1.1"),
        (["experiment=ablation", "experiment.batch_size=-2"], r"experiment.batch_size must be >= 1, got -2"),
    ],
)
def test_bad_values_are_refused_before_any_work(overrides, message):
    from mcollapse.config import validate
    from mcollapse.errors import UserError

    with pytest.raises(UserError, match=message):
        validate(_compose(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny_qwen2audio", "model.local_path=/nonexistent"],
         r"^model.local_path cannot apply to model 'tiny_qwen2audio': it is built offline"),
        (["model=smol_speech", "model.hub_id=Qwen/Qwen2-Audio-7B-Instruct"], r"^model.hub_id cannot apply"),
        (["model=smol_vision", "model.revision=main"], r"^model.revision cannot apply to model 'smol_vision'"),
        (["model=tiny_llava", "model.audio_window_s=5"], r"^model.audio_window_s cannot apply to .*takes image"),
        (["model=tiny_llama", "model.projector=shipped:smol_speech"], r"^model.projector cannot apply .*text-only"),
        (["experiment=shift", "experiment.sae.layer=3"], r"^experiment.sae.layer cannot apply without"),
        (["experiment=transfer", "+experiment.other_overrides.lora=/x"],
         r"^experiment.other_overrides cannot apply without experiment.other_model"),
        (["experiment.text.source=none", "experiment.text.format=raw"],
         r"^experiment.text.format=raw cannot apply with experiment.text.source=none"),
        (["target=reference", "target.keep_cut_clips=true"],
         r"^target.keep_cut_clips cannot apply to target=reference"),
        (["experiment.text.source=nosuch"],
         r"^experiment.text.source 'nosuch' is not a model config \(.*, self, none\)$"),
        (["experiment=shift", "experiment.other_model=nosuch"],
         r"^experiment.other_model 'nosuch' is not a model config"),
        (["experiment=transfer", "experiment.other_model=nosuch"], r"^experiment.other_model 'nosuch'"),
        (["experiment=similarity", "experiment.compare=[{name:a,model:nosuch}]"],
         r"^experiment.compare\[0\].model 'nosuch' is not a model config"),
        (["experiment=train_adapter", "experiment.n_train=0"], r"^experiment.n_train must be >= 1, got 0"),
        (["experiment=train_adapter", "experiment.n_dev=0"], r"^experiment.n_dev must be >= 1, got 0"),
        (["experiment=train_adapter", "experiment.eval_every=0"], r"^experiment.eval_every must be >= 1, got 0"),
    ],
)
def test_settings_that_cannot_apply_are_refused_naming_them(overrides, message):
    from mcollapse.config import validate
    from mcollapse.errors import UserError

    with pytest.raises(UserError, match=message):
        validate(_compose(overrides))


@pytest.mark.parametrize("overrides", [["model=qwen2audio", "model.local_path=/models/qwen2-audio"],
                                       ["experiment=shift", "experiment.sae.path=/x", "experiment.sae.layer=3"],
                                       ["experiment=transfer", "experiment.other_model=tiny_llama",
                                        "experiment.text.source=none", "experiment.text.format=raw"],
                                       ["experiment=similarity",
                                        "experiment.compare=[{name:r,model:smol_speech_random}]"],
                                       ["experiment.text.source=tiny_llama"], ["model=tiny_ultravox"]])
def test_settings_in_a_combination_that_uses_them_are_accepted(overrides):
    from mcollapse.config import validate

    validate(_compose(overrides))


@pytest.mark.parametrize("experiment", ["probe", "ablation", "gmi", "gradproj", "lipschitz", "lora", "modes",
                                        "msswap", "wasserstein", "extract"])
def test_shipped_defaults_are_valid(experiment):
    from mcollapse.config import validate

    validate(_compose([f"experiment={experiment}"]))
    if experiment in ("modes", "ablation"):  # rho is a variance ratio: thresholds above 1 are meaningful
        validate(_compose([f"experiment={experiment}", "modes.ms_threshold=50"]))
    validate(_compose([f"experiment={experiment}", "probe=reference", "model=tiny_llava", "dataset=coco"]))


def test_cuda_without_cuda_is_one_line(monkeypatch):
    import torch

    from mcollapse.config import validate
    from mcollapse.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"device=cuda:1 but this torch sees no CUDA GPU; use device=cpu or auto"):
        validate(_compose(["device=cuda:1"]))


@pytest.mark.parametrize("overrides", [["experiment=wasserstein", "experiment.n_bootstrap=0"],
                                       ["experiment=gmi", "experiment.n_samples=null"],
                                       ["experiment=lipschitz", "gradients.n_samples=null"],
                                       ["threads=null"], ["threads=auto"], ["threads=3"],
                                       ["experiment=lipschitz", "experiment.secant_samples=0"]])
def test_values_that_mean_none_or_all_are_accepted(overrides):
    from mcollapse.config import validate

    validate(_compose(overrides))


@pytest.mark.parametrize("override", ["experiment.n_alternatives=foo", "experiment.s=much", "experiment.n_samples=1.5",
                                      "modes.n_modes=foo", "modes.ms_threshold=half", "gradients.batch_size=x"])
def test_experiment_fields_are_typed(override):
    with pytest.raises(ConfigCompositionException):
        _compose(["experiment=gmi", override])


def test_every_experiment_option_extends_its_schema():
    from pathlib import Path

    from mcollapse.experiment_config import EXPERIMENTS

    shipped = {path.stem for path in (Path(config_dir()) / "experiment").glob("*.yaml")}
    assert shipped == set(EXPERIMENTS)
    for name in shipped:
        extra = ["report.runs=x"] if name in ("report", "verify") else []
        cfg = _compose([f"experiment={name}", *extra])
        assert OmegaConf.get_type(cfg.experiment) is EXPERIMENTS[name], name


def test_experiments_on_the_modes_read_one_modes_group():
    for experiment in ("modes", "lipschitz", "gradproj", "gmi", "ablation", "msswap"):
        cfg = _compose([f"experiment={experiment}", "modes.n_modes=7", "modes.ms_threshold=2"])
        assert (cfg.modes.n_modes, cfg.modes.ms_threshold) == (7, 2.0)
        assert "n_modes" not in cfg.experiment and "ms_threshold" not in cfg.experiment


def test_lora_settings_are_composed_only_for_the_lora_experiment():
    assert _compose(["experiment=probe"]).lora is None
    assert _compose(["experiment=lora"]).lora.name == "paper"
    assert _compose(["experiment=lora", "lora=cpu_small"]).lora.last_layers == 10
    with pytest.raises(ConfigCompositionException):
        _compose(["experiment=probe", "lora=cpu_small"])


def test_hook_modality_is_the_default_hooks_pooled_over_modality_positions():
    preset, default = _compose(["hook=modality"]).hook, _compose(["hook.pooling=modality"]).hook
    assert preset.pooling == default.pooling == "modality"
    assert {k: v for k, v in preset.items() if k != "name"} == {k: v for k, v in default.items() if k != "name"}


@pytest.mark.parametrize(("threads", "small", "expected"),
                         [("auto", True, 1), ("auto", False, None), (None, True, None), (3, True, 3)])
def test_threads_auto_gives_the_twins_one_thread(threads, small, expected):
    from mcollapse.runtime import thread_count

    assert thread_count(threads, small) == expected


def test_the_twins_are_marked_small_and_real_models_are_not():
    from pathlib import Path

    for path in (Path(config_dir()) / "model").glob("*.yaml"):
        assert _compose([f"model={path.stem}"]).model.small == path.stem.startswith("tiny_"), path
