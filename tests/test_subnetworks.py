"""Wanda masks and their overlap: planted scores, the chance IoU, calibration and pruning on a
tiny twin, and the weight_overlap experiment from the CLI on both twins."""

from __future__ import annotations

import json

import pytest
import torch

from mcollapse.analysis.subnetworks import (
    InputNorms,
    iou,
    keep_mask,
    random_iou,
    summarise_iou,
    wanda_scores,
)
from mcollapse.models import load_model
from mcollapse.models.decoder import Decoder
from mcollapse.pipeline.subnetworks import calibrate, linear_layers, pruned
from tests.helpers import model_cfg, only_run_dir, run_experiment


def test_identical_scores_overlap_fully():
    scores = torch.rand(64, 100, generator=torch.Generator().manual_seed(1))
    for s in (0.3, 0.5):
        assert iou(keep_mask(scores, s), keep_mask(scores.clone(), s)) == 1.0


@pytest.mark.parametrize("s", [0.3, 0.5])
def test_independent_random_scores_give_the_chance_iou(s):
    gen = torch.Generator().manual_seed(7)
    a, b = keep_mask(torch.rand(1000, 1000, generator=gen), s), keep_mask(torch.rand(1000, 1000, generator=gen), s)
    assert iou(a, b) == pytest.approx(random_iou(s), abs=0.005)
    assert random_iou(0.5) == pytest.approx(1 / 3)


def test_masks_keep_the_top_of_each_row_by_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 1.0]])
    norms = InputNorms(4)
    norms.add(torch.tensor([[1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 2.0]]))
    assert torch.allclose(norms.rms().float(), torch.tensor([1.0, 1.0, 0.0, 2.0]))
    scores = wanda_scores(weight, norms.rms())
    mask = keep_mask(scores, 0.5)
    # row 0: scores 1, 2, 0, 1 -> columns 1 and 0 (tie with 3 goes to the lower index)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, True]]
    assert mask.sum(dim=1).tolist() == [2, 2]


def test_iou_summaries_pool_layers_and_average_modules():
    table = {(0, "q"): (1, 2), (0, "down"): (3, 4), (1, "q"): (0, 2), (1, "down"): (2, 2)}
    out = summarise_iou(table)
    assert out["per_layer"] == {0: pytest.approx(4 / 6), 1: pytest.approx(2 / 4)}
    assert out["per_module"] == {"q": pytest.approx(0.25), "down": pytest.approx(0.875)}
    assert out["mean"] == pytest.approx((0.5 + 0.75 + 0 + 1) / 4)


def test_calibration_and_pruning_on_a_twin(cache_dir):
    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    decoder = Decoder(family)
    d = decoder.embed.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn(n, d, generator=gen) for n in (6, 4, 5)]
    flat = calibrate(decoder, zs, [0.5], 2, sequential=False)[0.5]
    seq = calibrate(decoder, zs, [0.5], 2, sequential=True)[0.5]
    layers = linear_layers(family.model)
    assert set(flat) == set(seq) == set(layers) and {n for _, n in layers} == {"q", "k", "v", "o", "gate", "up",
                                                                               "down"}
    for key in [k for k in layers if k[0] == 0]:  # block 0 reads no pruned layer: both agree there
        assert torch.equal(flat[key], seq[key])
    assert any(not torch.equal(flat[k], seq[k]) for k in layers if k[0] > 0)
    key = (1, "down")
    before = layers[key].weight.detach().clone()
    with pruned(family.model, flat):
        assert (layers[key].weight[~flat[key]] == 0).all()
        assert layers[key].weight.count_nonzero() <= flat[key].sum()
    assert torch.equal(layers[key].weight, before)


@pytest.mark.parametrize("args,model,dataset", [
    (["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
      "dataset.generate_options.n_per_class=8", "dataset.max_samples=12", "experiment.prune_eval=true"],
     "tiny_qwen2audio", "synthetic_speech"),
    (["model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=8", "experiment.sequential=true",
      "experiment.sparsities=[0.5]"], "tiny_llava", "synthetic_vision"),
])
def test_cli_weight_overlap(tmp_path, env, args, model, dataset):
    run_experiment(["experiment=weight_overlap", *args], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "weight_overlap" / model / dataset)
    results = json.loads((run / "results.json").read_text())
    s = results["summary"]
    assert s["modules"] == ["q", "k", "v", "o", "gate", "up", "down"] and s["n_blocks"] > 1
    for r in s["results"]:
        assert 0 < r["iou_mean"] <= 1 and set(r["iou_per_module"]) == set(s["modules"])
        assert len(r["iou_per_layer"]) == s["n_blocks"]
        assert r["iou_random"] == pytest.approx(random_iou(r["sparsity"]))
    if "experiment.prune_eval=true" in args:
        table = {(p["sparsity"], p["mask"], p["input"]): p for p in s["prune_eval"]}
        assert set(table) == {(0.0, "none", "modal"), (0.0, "none", "text")} | {
            (sp, m, i) for sp in (0.3, 0.5) for m in "PT" for i in ("modal", "text")}
        assert all(0 <= table[k]["p"] <= 1 for k in table if k[1] != "none")
    else:
        assert s["sequential"] and s["prune_eval"] is None
    for name in ("weight_overlap.png", "iou.csv", "results.csv", "meta.json"):
        assert (run / name).is_file(), name
