"""The layer-wise lenses: similarity, logit_lens and embedding_map, and the per-layer extraction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mcollapse.analysis import lens
from mcollapse.analysis import similarity as sim
from mcollapse.extraction.layers import _forward_layers, final_norm_and_head, layer_targets
from mcollapse.models import load_model
from mcollapse.models.roles import find_text_backbone
from tests.helpers import audio_samples, image_samples, model_cfg, only_run_dir, run_experiment

SMALL_SPEECH = ["dataset=synthetic_speech", "dataset.generate_options.n_speakers=4",
                "dataset.generate_options.n_per_class=8", "dataset.max_samples=16"]
SMALL_VISION = ["dataset=synthetic_vision", "dataset.max_samples=12", "dataset.generate_options.n_images=24",
                "dataset.generate_options.n_dev_images=4", "dataset.generate_options.n_train_images=4"]


# --- planted truths -------------------------------------------------------------------------------

def test_cosine_of_identical_inputs_is_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7))
    assert np.allclose(np.diag(sim.cosine_matrix(a, a)), 1.0)
    tokens = [rng.normal(size=(1, 7)) for _ in range(4)]
    for reduction, matrix in sim.token_pair_matrices(tokens, tokens).items():
        assert np.allclose(np.diag(matrix), 1.0), reduction


def test_all_pairs_and_matched_differ_by_a_planted_item_direction():
    n, d, shared = 6, 12, 2.0
    eye = np.eye(d)
    s = shared * eye[0]
    items = np.stack([s + eye[i + 1] for i in range(n)])  # shared direction + an orthogonal item direction
    matrix = sim.cosine_matrix(items, items.copy())
    matched, _, n_matched = sim.pair_summary(matrix, "matched")
    every, _, n_all = sim.pair_summary(matrix, "all")
    off_diagonal = shared ** 2 / (shared ** 2 + 1)
    assert matched == pytest.approx(1.0) and n_matched == n
    assert every == pytest.approx((1 + (n - 1) * off_diagonal) / n) and n_all == n * n
    assert sim.pair_summary(matrix, "all", same_items=True)[0] == pytest.approx(off_diagonal)
    # without the item directions the two agree
    flat = sim.cosine_matrix(np.tile(s, (n, 1)), np.tile(s, (n, 1)))
    assert sim.pair_summary(flat, "all")[0] == pytest.approx(sim.pair_summary(flat, "matched")[0])


def test_token_reductions_of_a_planted_pair():
    eye = np.eye(4)
    a = [np.stack([eye[0], eye[1], eye[0] + eye[1]])]
    b = [eye[:1]]
    out = sim.token_pair_matrices(a, b)
    cosines = [1.0, 0.0, 1 / math.sqrt(2)]
    assert out["mean"][0, 0] == pytest.approx(np.mean(cosines))
    assert out["median"][0, 0] == pytest.approx(np.median(cosines))
    assert out["max"][0, 0] == pytest.approx(1.0) and out["min"][0, 0] == pytest.approx(0.0)


def test_padding_never_enters_a_token_reduction():
    rng = np.random.default_rng(1)
    short, long = rng.normal(size=(1, 5)), rng.normal(size=(9, 5))
    together = sim.token_pair_matrices([short, long], [short, long])
    alone = sim.token_pair_matrices([short], [short])
    for reduction in sim.TOKEN_REDUCTIONS:
        assert together[reduction][0, 0] == pytest.approx(alone[reduction][0, 0])


def test_step_cosine_and_norms():
    rng = np.random.default_rng(2)
    tokens = [rng.normal(size=(3, 6)) for _ in range(4)]
    assert np.allclose(sim.token_step_cosine(tokens, [2 * t for t in tokens], "min"), 1.0)
    assert np.allclose(sim.token_step_cosine(tokens, [-t for t in tokens], "max"), -1.0)
    stacked = np.concatenate(tokens)
    norms = sim.norms(stacked[:4], stacked)
    assert norms["token_norm_max"] == pytest.approx(np.linalg.norm(stacked, axis=1).max())


def test_noise_keeps_shape_and_scale_and_shares_no_direction():
    rng = np.random.default_rng(3)
    tokens = [np.ones((50, 64)) * 3.0 + rng.normal(size=(50, 64)) for _ in range(3)]
    noise = sim.uniform_noise_like(tokens, rng)
    for real, fake in zip(tokens, noise):
        assert fake.shape == real.shape
        assert np.allclose(np.linalg.norm(fake, axis=1), np.linalg.norm(real, axis=1))
    assert abs(sim.cosine_matrix(np.concatenate(noise), np.ones((1, 64))).mean()) < 0.05


def test_ima_curve_is_one_where_text_equals_the_media_input():
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(5, 8))
    t = np.stack([p0, rng.normal(size=(5, 8)), -p0], axis=1)  # (N, L+1, d)
    curve = sim.ima_curve(p0, t, "matched")
    assert curve[0] == pytest.approx(1.0) and curve[2] == pytest.approx(-1.0)


def test_kl_and_entropy_planted():
    vocab = 11
    uniform = lens.log_probs(torch.zeros(1, vocab))
    one_hot = lens.log_probs(torch.tensor([[0.0] + [-1e4] * (vocab - 1)]))
    assert lens.entropy(uniform).item() == pytest.approx(math.log(vocab), abs=1e-6)
    assert lens.entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    p = lens.log_probs(torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(lens.kl(p, p), torch.zeros(4), atol=1e-7)
    q = lens.log_probs(torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)))
    assert bool((lens.kl(p, q) > 0).all())
    two = torch.cat([one_hot, one_hot.roll(1, dims=-1)])
    assert lens.mixture(two, dim=0).exp()[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


# --- the media + text input and the per-layer capture -------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_qwen2audio", "tiny_ultravox", "tiny_llava"])
def test_media_then_text_marks_p_and_t_and_leaves_p_as_alone(name, cache_dir):
    family = load_model(model_cfg(name), cache_dir, "cpu")
    samples = audio_samples([0.6, 1.1]) if family.modality == "audio" else image_samples(2)
    texts = ["a short one", "and a somewhat longer caption here"]
    alone = family.prepare(samples)
    both = family.prepare_with_text(samples, texts)
    ids = both.inputs["input_ids"]
    for row, text in enumerate(texts):
        body = family.text_token_ids(text)
        assert ids[row][both.text_token_mask[row]].tolist() == body
        assert int(both.modal_token_mask[row].sum()) == int(alone.modal_token_mask[row].sum())
        assert bool((ids[row][both.modal_token_mask[row]] == family.placeholder_id).all())
        assert not bool((both.modal_token_mask[row] & both.text_token_mask[row]).any())
        assert int(both.token_mask[row].sum()) == int(alone.token_mask[row].sum()) + len(body)
    targets = layer_targets(family)
    assert len(targets) == len(find_text_backbone(family.model).layers) + 1
    p_mask = both.modal_token_mask.clone()
    with_text = _forward_layers(family, both, targets)
    media_only = _forward_layers(family, alone, targets)
    for row in range(len(samples)):  # causal: the media positions never see the text after them
        a = with_text[row][p_mask[row]]
        b = media_only[row][alone.modal_token_mask[row]]
        assert torch.allclose(a, b, atol=1e-4)


def test_last_index_is_raw_and_the_lens_applies_the_norm_once(cache_dir):
    family = load_model(model_cfg("tiny_qwen2audio"), cache_dir, "cpu")
    samples = audio_samples([0.8])
    batch = family.prepare_with_text(samples, ["hello there"])
    t_mask = batch.text_token_mask.clone()
    states = _forward_layers(family, batch, layer_targets(family))[0]  # (S, L+1, d)
    norm, head = final_norm_and_head(family)
    with torch.no_grad():
        out = family.model(**batch.inputs, output_hidden_states=True, use_cache=False)
    hf_last = out.hidden_states[-1][0].float()
    assert torch.allclose(norm(states[:, -1]), hf_last, atol=1e-4)  # transformers' last entry is normed
    assert not torch.allclose(states[:, -1], hf_last, atol=1e-3)  # ours is not
    with torch.no_grad():
        lens_logits = head(norm(states[t_mask[0], -1]))
    assert torch.allclose(lens_logits, out.logits[0][t_mask[0]].float(), atol=1e-3)
    embeds = family.model.get_input_embeddings()(batch.inputs["input_ids"])[0]
    assert torch.allclose(states[t_mask[0], 0], embeds[t_mask[0]], atol=1e-5)  # index 0: the LLM input


# --- the experiments from the CLI ---------------------------------------------------------------------

def _results(tmp_path, experiment, model, dataset):
    run = only_run_dir(tmp_path / "outputs" / experiment / model / dataset)
    return run, json.loads((run / "results.json").read_text())


def test_similarity_on_speech_with_a_comparison_and_a_cache_hit(tmp_path, env):
    args = ["experiment=similarity", "model=tiny_qwen2audio", *SMALL_SPEECH, "experiment.max_tokens=6",
            "experiment.poolings=[pooled,mean,max]",
            "experiment.compare=[{name: again, model: tiny_qwen2audio}]"]
    run_experiment(args, tmp_path, env)
    run, results = _results(tmp_path, "similarity", "tiny_qwen2audio", "synthetic_speech")
    summary = results["summary"]
    assert set(summary["ima"]) == {"tiny_qwen2audio", "again"}
    assert summary["ima"]["tiny_qwen2audio"]["all"] == pytest.approx(summary["ima"]["again"]["all"])
    assert {"ima_score.png", "similarity_layers.png", "meta.json", "results.csv"} <= {p.name for p in run.iterdir()}
    families = {r["info_type"] for r in results["rows"]}
    assert {"P-T", "P-P", "T-T", "intra-P", "intra-T", "step1-P", "step8-T", "noise-T", "norm-P", "ima"} <= families
    layers = summary["n_layers"]
    assert len(summary["layers"]["P-T_all"]) == layers == len(results["ima_curves"]["tiny_qwen2audio"]["all"]["curve"])
    meta = json.loads((run / "meta.json").read_text())
    assert meta["counts"]["layer_tokens_computed"] > 0 and meta["counts"]["layer_tokens_computed_again"] == 0


def test_logit_lens_and_embedding_map_on_vision(tmp_path, env):
    run_experiment(["experiment=logit_lens", "model=tiny_llava", *SMALL_VISION, "experiment.max_tokens=4",
                    "experiment.layers=[0,2]", "experiment.text_pass=separate"], tmp_path, env)
    run, results = _results(tmp_path, "logit_lens", "tiny_llava", "synthetic_vision")
    curves = results["curves"]
    vocab = results["summary"]["vocab_size"]
    assert all(0 <= v <= math.log(vocab) + 1e-6 for v in curves["entropy_P"] + curves["entropy_T"])
    assert len(curves["entropy_P"]) == results["summary"]["n_layers"]
    assert all(v >= -1e-6 for v in curves["kl_PT_matched"] + curves["kl_step_P_k1"])
    assert {"logit_lens.png", "top_tokens.png", "top_tokens.csv"} <= {p.name for p in run.iterdir()}
    assert {r["layer"] for r in results["top_tokens"]} == {0, 2}
    run_experiment(["experiment=embedding_map", "model=tiny_llava", *SMALL_VISION, "experiment.max_tokens=4",
                    "experiment.text_pass=separate", "experiment.methods=[pca,tsne]"], tmp_path, env)
    run, results = _results(tmp_path, "embedding_map", "tiny_llava", "synthetic_vision")
    assert {"embedding_map.png", "embedding_map.csv", "embedding_map.npz"} <= {p.name for p in run.iterdir()}
    assert set(results["summary"]["separation"]) >= {"pca_layer0", "tsne_layer0"}
    assert json.loads((run / "meta.json").read_text())["counts"]["layer_tokens_computed"] == 0  # the lens's entry


def test_logit_lens_and_embedding_map_on_speech(tmp_path, env):
    run_experiment(["experiment=logit_lens", "model=tiny_qwen2audio", *SMALL_SPEECH, "experiment.max_tokens=4"],
                   tmp_path, env)
    _, results = _results(tmp_path, "logit_lens", "tiny_qwen2audio", "synthetic_speech")
    assert results["summary"]["n_items"] > 0
    run_experiment(["experiment=embedding_map", "model=tiny_qwen2audio", *SMALL_SPEECH, "experiment.max_tokens=4"],
                   tmp_path, env)
    _, results = _results(tmp_path, "embedding_map", "tiny_qwen2audio", "synthetic_speech")
    assert "emotion" in results["summary"]["labels"]
