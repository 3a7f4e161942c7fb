"""Planted truths of the representation-shift math (analysis/shift.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mcollapse.analysis.shift import (
    LayerShift,
    SaeShift,
    active_jaccard,
    cosine,
    linear_cka,
    load_sae,
    row_cosines,
)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize(("n", "d"), [(200, 16), (10, 40)])  # the feature-space and the Gram branch
def test_cka_of_identical_inputs_is_one_and_invariant_to_rotation_and_scale(n, d):
    x = np.random.default_rng(0).normal(size=(n, d))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.7 * x @ _rotation(d, 1)) == pytest.approx(1.0)
    assert linear_cka(x + 5.0, x) == pytest.approx(1.0)  # centred: a constant offset does not count


def test_cka_of_independent_inputs_is_small_and_shape_mismatch_refused():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert linear_cka(x, y) < 0.05
    # a non-orthogonal (anisotropic) map is not an invariance of CKA
    assert linear_cka(x, x * np.array([10.0] + [0.1] * 7)) < 0.5
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, y[:10])


def test_layer_shift_of_identical_tokens_and_of_a_planted_offset():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 6)) + 2.0
    same = LayerShift()
    same.update(a[:20], a[:20])
    same.update(a[20:], a[20:])
    out = same.result()
    assert out["cosine_of_means"] == pytest.approx(1.0) and out["l2_of_means"] == pytest.approx(0.0)
    assert out["mean_token_l2"] == pytest.approx(0.0) and out["mean_token_cosine"] == pytest.approx(1.0)
    assert out["n_tokens"] == 50
    offset = np.zeros(6)
    offset[2] = 0.5
    shifted = LayerShift()
    shifted.update(a, a + offset)
    out = shifted.result()
    assert out["l2_of_means"] == pytest.approx(0.5) and out["mean_token_l2"] == pytest.approx(0.5)
    assert cosine(a.mean(0), (a + offset).mean(0)) == pytest.approx(out["cosine_of_means"])


def _write_sae(path, d=8, f=32, seed=0, threshold=0.1):
    rng = np.random.default_rng(seed)
    w_enc = rng.normal(size=(d, f)).astype(np.float32)
    np.savez(path, W_enc=w_enc, b_enc=np.zeros(f, np.float32), threshold=np.full(f, threshold, np.float32),
             W_dec=(w_enc.T / f).astype(np.float32), b_dec=np.zeros(d, np.float32))
    return path


def test_jaccard_and_feature_cosine_of_identical_active_sets_are_one():
    f = np.array([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    assert active_jaccard(f, f).tolist() == [1.0, 1.0, 1.0]
    assert row_cosines(f, f) == pytest.approx([1.0, 1.0, 1.0])
    g = np.array([[0.0, 1.0, 0.0, 5.0], [1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    assert active_jaccard(f, g).tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    assert row_cosines(f, g)[1] == 0.0


def test_sae_jumprelu_and_reconstruction_stats(tmp_path):
    sae = load_sae(_write_sae(tmp_path / "params.npz"))
    x = np.random.default_rng(3).normal(size=(40, 8))
    pre = x @ sae.w_enc
    f = sae.encode(x)
    assert np.all((f > 0) == (pre > 0.1)) and np.allclose(f[f > 0], pre[f > 0], atol=1e-5)
    stats = SaeShift(sae)
    stats.update(x, x)
    out = stats.result()
    assert out["sae_mean_jaccard"] == 1.0 and out["sae_mean_feature_cosine"] == pytest.approx(1.0)
    assert out["sae_fve_a"] == pytest.approx(out["sae_fve_b"]) and out["sae_l0_a"] == out["sae_l0_b"] > 0
    err = ((x - sae.decode(f)) ** 2).sum()
    assert out["sae_relative_mse_a"] == pytest.approx(err / (x ** 2).sum(), rel=1e-5)
    assert out["sae_fve_a"] == pytest.approx(1 - err / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)


def test_sae_file_with_a_missing_key_is_refused(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lacks b_enc"):
        load_sae(tmp_path)
