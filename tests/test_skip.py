"""Computation skipping: the interval rule, FLOP accounting, greedy agreement, the hooks against
direct recomputations on a tiny twin, and the experiment from the CLI on both twins."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mcollapse.analysis.skipping import block_flops, greedy_agreement, skipped_blocks, skipped_flops
from mcollapse.models import load_model
from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.models.roles import block_parts, decoder_blocks
from mcollapse.pipeline.block_skip import Gate, gate_for, skipping
from tests.helpers import model_cfg, only_run_dir, run_experiment

SPEECH = ["model=tiny_qwen2audio", "dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
          "dataset.generate_options.n_per_class=8", "dataset.max_samples=16", "experiment.max_new_tokens=5"]
VISION = ["model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=8", "experiment.max_new_tokens=4"]


def test_interval_rule_and_exit():
    assert skipped_blocks(12, "block", 2, 9, 3) == [3, 6]
    assert skipped_blocks(12, "ffn", 0, None, 2) == [2, 4, 6, 8, 10]
    assert skipped_blocks(12, "block", 0, None, 13) == []  # an interval beyond the depth skips nothing
    assert skipped_blocks(12, "parallel", 5, 5, 1) == [] and skipped_blocks(12, "block", 7, 3, 1) == []
    assert skipped_blocks(12, "exit", 8, 3, 5) == [9, 10, 11]
    with pytest.raises(ValueError):
        skipped_blocks(12, "nothing", 0, None, 1)


def test_flops_per_operation():
    flops = block_flops({"q": (8, 8), "k": (8, 4), "v": (8, 4), "o": (8, 8), "gate": (8, 16), "up": (8, 16),
                         "down": (16, 8)})
    valid = np.array([[True, True, True, False]])
    everything = np.ones_like(valid)
    saved, total = skipped_flops(flops, 4, 4, "block", everything, valid, keys_needed=False)
    assert saved == pytest.approx(total) and total > 0  # every block at every real position: all of it
    assert skipped_flops(flops, 4, 4, "parallel", everything, valid, False)[0] == 0
    mlp = skipped_flops(flops, 4, 2, "ffn", everything, valid, False)[0]
    assert mlp == pytest.approx(2 * 3 * flops.mlp)  # padding never counts
    with_keys = skipped_flops(flops, 4, 1, "block", everything, valid, keys_needed=True)[0]
    without = skipped_flops(flops, 4, 1, "block", everything, valid, keys_needed=False)[0]
    assert without - with_keys == pytest.approx(3 * (2 * 8 * 4) * 2)


def test_greedy_agreement():
    out = greedy_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6, 7]])
    assert out["exact_match"] == 0.5 and out["token_agreement"] == pytest.approx(4 / 6)
    assert greedy_agreement([[]], [[]]) == {"exact_match": 1.0, "token_agreement": 1.0}


@pytest.fixture(scope="module")
def tiny(cache_dir):
    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    decoder = Decoder(family)
    d = decoder.embed.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn(n, d, generator=gen) * 0.02 for n in (5, 3)]
    answers = [family.answer_token_ids(t) for t in ("one two", "three")]
    return family, decoder, zs, answers


def _scores(decoder, zs, answers, **skip):
    batch = compose(decoder.family, [len(z) for z in zs], answers, "content", "sum")
    with torch.no_grad():
        if not skip:
            return decoder.scores(batch, pad_sequences(zs))
        gate = gate_for(skip.pop("gating"), batch.z_rows, batch.z_cols, [0, 0], batch.input_ids.shape[1])
        with skipping(decoder.model, gate=gate, **skip):
            return decoder.scores(batch, pad_sequences(zs))


def test_no_skipped_block_is_the_baseline_exactly(tiny):
    family, decoder, zs, answers = tiny
    base = _scores(decoder, zs, answers)
    for op in ("block", "ffn", "parallel"):
        assert torch.equal(_scores(decoder, zs, answers, blocks=[], op=op, gating="all"), base)
    # a skip that gates nothing leaves the pass as it was too
    changed = _scores(decoder, zs, answers, blocks=[1, 2], op="block", gating="all")
    assert not torch.allclose(changed, base)


def test_skipping_every_block_leaves_the_embeddings(tiny):
    family, decoder, zs, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    blocks = list(range(len(decoder_blocks(family.model))))
    gate = Gate(torch.ones((1, 4), dtype=torch.bool), True)
    with torch.no_grad(), skipping(family.model, blocks, "block", gate):
        hidden = decoder.backbone(input_ids=ids).last_hidden_state
        expected = decoder.backbone.norm(decoder.embed(ids))
    assert torch.allclose(hidden, expected, atol=1e-6)


def test_ffn_and_parallel_match_direct_recomputations(tiny):
    family, decoder, zs, answers = tiny
    blocks = [1, 3]
    skipped = _scores(decoder, zs, answers, blocks=blocks, op="ffn", gating="all")
    zeroed = copy.deepcopy(family.model)
    for b in blocks:
        block_parts(decoder_blocks(zeroed)[b]).mlp.down_proj.weight.data.zero_()
    original = decoder.model, decoder.backbone
    from mcollapse.models.roles import find_text_backbone
    decoder.model, decoder.backbone = zeroed, find_text_backbone(zeroed)
    try:
        reference = _scores(decoder, zs, answers)
    finally:
        decoder.model, decoder.backbone = original
    assert torch.allclose(skipped, reference, atol=1e-5)

    block = decoder_blocks(family.model)[2]
    parts = block_parts(block)
    captured = {}
    block.register_forward_pre_hook(lambda m, a, k: captured.update(x=a[0] if a else k["hidden_states"],
                                                                   kw=k), with_kwargs=True)
    handle_out = block.register_forward_hook(lambda m, a, k, o: captured.update(out=o), with_kwargs=True)
    gate = Gate(torch.ones((1, 4), dtype=torch.bool), True)
    with torch.no_grad(), skipping(family.model, [2], "parallel", gate):
        decoder.backbone(input_ids=torch.tensor([[5, 6, 7, 8]]))
    block._forward_pre_hooks.clear()
    handle_out.remove()
    x, kw = captured["x"], captured["kw"]
    with torch.no_grad():
        attn = parts.attention(hidden_states=parts.input_norm(x), **{k: v for k, v in kw.items()
                                                                     if k not in ("hidden_states",)})[0]
        expected = x + attn + parts.mlp(parts.input_norm(x))
    out = captured["out"] if isinstance(captured["out"], torch.Tensor) else captured["out"][0]
    assert torch.allclose(out, expected, atol=1e-5)


def _results(root, experiment, model, dataset):
    run = only_run_dir(root / "outputs" / experiment / model / dataset)
    return run, json.loads((run / "results.json").read_text())


def test_cli_interval_beyond_depth_is_the_baseline(tmp_path, env):
    run_experiment(["experiment=skip", *SPEECH, "experiment.intervals=[1000]", "experiment.operations=[block,ffn]",
                    "experiment.gating=[all,decode]"], tmp_path, env)
    run, results = _results(tmp_path, "skip", "tiny_qwen2audio", "synthetic_speech")
    s = results["summary"]
    assert len(s["conditions"]) == 4 and s["n_samples"] > 5 and "baseline_wer" in s
    for c in s["conditions"]:
        assert c["blocks"] == [] and c["delta_loss"] == 0 and c["exact_match"] == 1 and c["token_agreement"] == 1
        assert c["flops_skipped_fraction"] == 0 and c["wer"] == results["summary"]["baseline_wer"]
    for name in ("skip.png", "per_sample.csv", "results.csv", "meta.json"):
        assert (run / name).is_file(), name


def test_cli_all_operations_on_the_vision_twin(tmp_path, env):
    run_experiment(["experiment=skip", *VISION, "experiment.gating=[modality,all]"], tmp_path, env)
    run, results = _results(tmp_path, "skip", "tiny_llava", "synthetic_vision")
    conds = {c["name"]: c for c in results["summary"]["conditions"]}
    assert len(conds) == 4 * 2 and "baseline_token_f1" in results["summary"]
    assert conds["exit/all/after0"]["flops_skipped_fraction"] > conds["block/all/every2"]["flops_skipped_fraction"]
    assert conds["block/all/every2"]["flops_skipped_fraction"] > conds["ffn/all/every2"]["flops_skipped_fraction"] > 0
    assert conds["parallel/modality/every2"]["flops_skipped_fraction"] == 0
    assert all(0 <= c["token_f1"] <= 1 and 0 <= c["exact_match"] <= 1 for c in conds.values())
    assert results["counts"]["skip_batches"] >= 1 and (run / "skip.png").is_file()
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[0].startswith("experiment,model,dataset,hook") and len(rows) > 20
