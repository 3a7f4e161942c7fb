"""The shipped organisms: trained projector weights in the package that load into their model and
reproduce the held-out loss recorded when they were trained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mcollapse.data import load_records
from mcollapse.extraction.sequences import adapter_sequences
from mcollapse.models import load_model
from mcollapse.models.adapter_train import Example, evaluate
from mcollapse.models.decoder import Decoder
from mcollapse.models.projector import ORGANISMS_DIR, WEIGHTS_FILE, projector_module
from tests.helpers import config_dir, model_cfg

SHIPPED = sorted(p.name for p in ORGANISMS_DIR.iterdir() if (p / WEIGHTS_FILE).is_file())
MAX_BYTES = 5 * 1024 * 1024


def test_the_speech_and_vision_organisms_are_shipped():
    assert {"smol_speech", "smol_vision"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_organism_is_small_and_says_how_it_was_made(name):
    folder = ORGANISMS_DIR / name
    record = json.loads((folder / "organism.json").read_text())
    assert (folder / WEIGHTS_FILE).stat().st_size <= MAX_BYTES
    assert record["reproduce"].startswith("mcollapse experiment=train_adapter")
    assert record["disjoint_from_train"]["eval"]["media"] == 0
    for split in ("train", "dev", "eval"):
        assert len(record["data"][split]["fingerprint"]) == 64 and record["data"][split]["n"] > 0
    assert {"heldout_loss_per_token", "heldout_gmi", "heldout_gmi_ci_low"} <= set(record["heldout"])
    assert OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml").projector == f"shipped:{name}"


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_projector_reproduces_its_recorded_heldout_loss(name, shared_cache, tmp_path):
    """Loads through model=<name> (build + shipped weights) and scores the recorded held-out samples."""
    record = json.loads((ORGANISMS_DIR / name / "organism.json").read_text())
    check = record["check"]
    dataset_cfg = OmegaConf.load(Path(config_dir()) / "dataset" / f"{check['dataset']}.yaml")
    dataset_cfg.pop("defaults", None)
    data_root = Path(os.environ.get("MCOLLAPSE_DATA", Path.home() / ".cache" / "mcollapse" / "data"))
    OmegaConf.update(dataset_cfg, "paths", {"data_root": str(data_root)}, force_add=True)
    dataset_cfg = OmegaConf.create(OmegaConf.to_container(dataset_cfg, resolve=True))
    records, info = load_records(dataset_cfg)
    wanted = [r for r in records if r.id in set(check["ids"])]
    assert len(wanted) == len(check["ids"]), "the held-out samples were not regenerated identically"

    family = load_model(model_cfg(name), shared_cache, "cpu")
    sequences = adapter_sequences(family, wanted, {"name": check["dataset"], "fingerprint": info["fingerprint"]},
                                  tmp_path / "cache", role="encoder_output")
    texts = {r.id: r.text for r in wanted}
    examples = [Example(i, x, family.answer_token_ids(texts[i])) for i, x in zip(sequences.ids, sequences.arrays)]
    _, projector = projector_module(family.model, family.adapter_module_names())
    loss, _ = evaluate(Decoder(family), projector, examples, family.prompt_token_parts(), 16)
    assert loss == pytest.approx(check["loss_per_token"], rel=1e-3)
    # and it is the trained projector that does it: the random twin reads the same audio far worse
    assert loss < record["training"]["initial_dev_loss"] - 0.5
