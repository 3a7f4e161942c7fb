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
