"""L_log, D and D_eff: closed forms of a linear log-softmax decoder, exact distances, known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from mcollapse.analysis.lipschitz import (
    covariance_eigenvalues,
    diameter,
    effective_diameter,
    equal_length_neighbours,
    gradient_norm_histogram,
    gradient_norm_stats,
    linear_softmax_lipschitz,
    lipschitz_summary,
    participation_ratio,
    per_sample_gradient_norms,
    reference_diameter,
    secant_lipschitz,
)


def linear_decoder(V: int = 5, T: int = 3, d: int = 4, seed: int = 0):
    """q(y | z) = softmax(W vec(z) + b)_y over a (T, d) sequence z, in float64."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, T * d, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    return W, b


def linear_scores(W, b, y):
    def score_fn(z):
        logp = torch.log_softmax(z.reshape(len(z), -1) @ W.T + b, dim=-1)
        return logp[torch.arange(len(z)), y]

    return score_fn


def closed_form_norms(W, b, z, y):
    """||W_y - W^T p|| with p = softmax(W z + b)."""
    p = torch.softmax(z.reshape(len(z), -1) @ W.T + b, dim=-1)
    grad = W[y] - p @ W
    return torch.linalg.vector_norm(grad, dim=1)


def test_gradient_norms_match_closed_form_and_batching():
    W, b = linear_decoder()
    gen = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(16, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=gen)
    norms = per_sample_gradient_norms(linear_scores(W, b, y), z)
    torch.testing.assert_close(norms, closed_form_norms(W, b, z, y), rtol=1e-12, atol=1e-12)

    one_by_one = torch.cat(
        [per_sample_gradient_norms(linear_scores(W, b, y[i : i + 1]), z[i : i + 1]) for i in range(len(z))]
    )
    torch.testing.assert_close(norms, one_by_one, rtol=1e-12, atol=1e-12)
    assert not z.requires_grad  # the caller's tensor is left alone


def test_linear_decoder_lipschitz_is_its_known_bound():
    """Every gradient norm is below max_j ||W_y - W_j||, and the supremum is reached."""
    W, b = linear_decoder(V=5, T=3, d=4, seed=2)
    Wn = W.numpy()
    crude = 2 * np.linalg.norm(Wn, axis=1).max()
    exact = linear_softmax_lipschitz(Wn)
    assert exact <= crude
    assert exact == pytest.approx(pdist(Wn).max(), rel=1e-12)

    gen = torch.Generator().manual_seed(3)
    for scale in (0.1, 1.0, 10.0, 100.0):
        z = scale * torch.randn(200, 3, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (200,), generator=gen)
        norms = per_sample_gradient_norms(linear_scores(W, b, y), z).numpy()
        per_y = np.array([linear_softmax_lipschitz(Wn, int(t)) for t in y])
        assert np.all(norms <= per_y * (1 + 1e-12))

    # Push the softmax onto the row farthest from W_y: the gradient tends to W_y - W_far.
    target = 0
    far = int(np.argmax(np.linalg.norm(Wn - Wn[target], axis=1)))
    direction = torch.linalg.pinv(W)[:, far]  # W @ direction = e_far (W has full row rank)
    z = (60.0 * direction).reshape(1, 3, 4)
    norm = per_sample_gradient_norms(linear_scores(W, b, torch.tensor([target])), z).item()
    assert norm == pytest.approx(linear_softmax_lipschitz(Wn, target), rel=1e-10)


def test_mask_return_grad_and_shape_checks():
    W, b = linear_decoder()
    z = torch.randn(4, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    norms, grad = per_sample_gradient_norms(linear_scores(W, b, y), z, mask=mask, return_grad=True)
    full = W[y] - torch.softmax(z.reshape(4, -1) @ W.T + b, -1) @ W
    expected = torch.linalg.vector_norm(full.reshape(4, 3, 4) * mask[..., None], dim=(1, 2))
    torch.testing.assert_close(norms, expected)
    assert grad.shape == z.shape and torch.all(grad[1, 2] == 0)

    constant = per_sample_gradient_norms(lambda t: torch.zeros(len(t)), z)
    assert torch.all(constant == 0)
    with pytest.raises(ValueError, match="one score per sample"):
        per_sample_gradient_norms(lambda t: t.sum(), z)
    with pytest.raises(ValueError, match="mask shape"):
        per_sample_gradient_norms(linear_scores(W, b, y), z, mask=mask[:, :2])


def test_half_precision_input_gives_float32_norms():
    W, b = linear_decoder()
    z = torch.randn(3, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    Wf, bf = W.float(), b.float()
    norms = per_sample_gradient_norms(lambda t: linear_scores(Wf, bf, y)(t.float()), z.to(torch.bfloat16))
    assert norms.dtype == torch.float32


def test_gradient_norm_stats_and_histogram():
    values = np.concatenate([np.arange(1.0, 101.0), [np.nan, np.inf]])
    stats = gradient_norm_stats(torch.tensor(values))
    assert stats["n"] == 100 and stats["n_nonfinite"] == 2
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p95"] == pytest.approx(np.percentile(np.arange(1.0, 101.0), 95))
    assert stats["max"] == 100.0 and stats["min"] == 1.0
    hist = gradient_norm_histogram(values, bins=10)
    assert sum(hist["counts"]) == 100 and len(hist["edges"]) == 11
    with pytest.raises(ValueError):
        gradient_norm_stats([np.nan])


def test_diameter_exact_quantile_and_sampled():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20)) * rng.uniform(0.1, 3.0, size=20) + 50.0
    distances = pdist(X)
    assert diameter(X, chunk_size=37) == pytest.approx(distances.max(), rel=1e-10)
    assert diameter(X, quantile=0.99, chunk_size=64) == pytest.approx(np.quantile(distances, 0.99), rel=1e-10)
    sampled = diameter(X, max_pairs=2000, seed=1)
    assert sampled <= distances.max() * (1 + 1e-12)
    assert diameter(X, max_pairs=10**9) == pytest.approx(distances.max(), rel=1e-10)
    # Hand example: the four points (+-2, 0), (0, +-1).
    four = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert diameter(four) == pytest.approx(4.0)


def test_reference_diameter_is_max_of_its_two_parts():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 8))
    d_std = X.std() * math.sqrt(8)  # all 100 rows are kept when n_rows >= n
    ref = reference_diameter(X, n_rows=500)
    assert ref >= d_std - 1e-12
    assert ref <= max(d_std, pdist(X).max()) + 1e-12


def test_covariance_spectrum_both_shapes():
    rng = np.random.default_rng(2)
    for n, d in ((30, 80), (200, 10)):
        X = rng.normal(size=(n, d))
        expected = np.sort(np.clip(np.linalg.eigvalsh(np.cov(X, rowvar=False)), 0, None))[::-1]
        got = covariance_eigenvalues(X)
        np.testing.assert_allclose(got[: min(n - 1, d)], expected[: min(n - 1, d)], rtol=1e-9, atol=1e-12)


def test_participation_ratio_and_effective_diameter_hand_example():
    """Points (+-2, 0), (0, +-1): covariance diag(8/3, 2/3), so PR = (10/3)^2 / (68/9) = 25/17."""
    four = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    pr = participation_ratio(four)
    assert pr == pytest.approx(25 / 17)
    eff = effective_diameter(four)
    captured = 8 / 3 + (25 / 17 - 1) * 2 / 3
    assert eff.captured_variance == pytest.approx(captured)
    assert eff.d_eff == pytest.approx(2 * math.sqrt(captured))
    assert eff.total_variance == pytest.approx(10 / 3)
    assert participation_ratio(eigenvalues=[1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert participation_ratio(eigenvalues=[5.0, 0.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        participation_ratio(np.ones((5, 3)))  # no variance at all


def test_effective_diameter_recovers_a_sphere_in_a_subspace():
    """Points on a 3-sphere of radius 5 inside 50 dimensions: PR = 3 and D_eff = 10 = D."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(3000, 3))
    u *= 5.0 / np.linalg.norm(u, axis=1, keepdims=True)
    basis, _ = np.linalg.qr(rng.normal(size=(50, 3)))
    X = u @ basis.T + rng.normal(size=50)
    eff = effective_diameter(X)
    assert eff.participation_ratio == pytest.approx(3.0, abs=0.05)
    assert eff.d_eff == pytest.approx(10.0, rel=0.02)
    assert diameter(X) == pytest.approx(10.0, rel=0.005)


def test_secant_slopes_are_lower_bounds_on_the_linear_lipschitz_constant():
    W, b = linear_decoder(V=4, T=2, d=3, seed=4)
    rng = np.random.default_rng(5)
    Z = rng.normal(size=(60, 2, 3))
    y = rng.integers(0, 4, size=60)
    logp = torch.log_softmax(torch.from_numpy(Z.reshape(60, -1)) @ W.T + b, dim=-1).numpy()  # (n_z, V)
    neighbours, dist = equal_length_neighbours(list(Z), k=2)
    own = logp[np.arange(60), y]
    other = logp[neighbours, y[:, None]]  # sample i's target with its neighbours' z
    slopes = secant_lipschitz(own, other, dist)
    per_y = np.array([linear_softmax_lipschitz(W.numpy(), int(t)) for t in y])
    assert np.all(np.isfinite(slopes)) and np.all(slopes > 0)
    assert np.all(slopes <= per_y * (1 + 1e-12))
    with pytest.raises(ValueError):
        secant_lipschitz(own[:5], other, dist)


def test_neighbours_pair_only_sequences_of_equal_length():
    arrays = [np.zeros((2, 1)), np.full((2, 1), 3.0), np.ones((2, 1)), np.zeros((5, 1)), np.ones((4, 1))]
    index, dist = equal_length_neighbours(arrays, k=2)
    np.testing.assert_array_equal(index[0], [2, 1])  # distances sqrt(2) and sqrt(18)
    assert dist[0] == pytest.approx([math.sqrt(2), math.sqrt(18)])
    np.testing.assert_array_equal(index[1], [2, 0])
    assert (index[3] == -1).all() and (index[4] == -1).all() and np.isinf(dist[3]).all()
    slopes = secant_lipschitz(np.array([0.0, 1.0, 2.0, 0.0, 0.0]), np.where(index >= 0, 1.0, np.nan), dist)
    assert slopes[0] == pytest.approx(1 / math.sqrt(2)) and np.isnan(slopes[3])


def test_lipschitz_summary_products():
    rng = np.random.default_rng(6)
    norms = rng.gamma(2.0, 1.0, size=500)
    X = rng.normal(size=(200, 30))
    out = lipschitz_summary(norms, X)
    assert out["D"] == pytest.approx(pdist(X).max(), rel=1e-10)
    assert out["D_q99"] <= out["D"]
    assert out["L_p95_x_D"] == pytest.approx(out["L_p95"] * out["D"])
    assert out["L_mean_x_D_eff"] == pytest.approx(out["L_mean"] * out["D_eff"])
    assert out["L_n"] == 500


def test_padded_attention_batch_matches_unpadded_samples():
    """A transformer scored on a right-padded batch gives each sample its unpadded gradient norm."""
    torch.manual_seed(7)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    head = torch.nn.Linear(8, 5)
    layer, head = layer.double().eval(), head.double().eval()
    lengths = [6, 3, 5]
    y = torch.tensor([1, 4, 0])

    def scores(z, valid, targets):
        hidden = layer(z, src_key_padding_mask=~valid)
        pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return torch.log_softmax(head(pooled), -1)[torch.arange(len(z)), targets]

    z = torch.randn(3, 6, 8, dtype=torch.float64)
    valid = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    batched = per_sample_gradient_norms(lambda t: scores(t, valid, y), z, mask=valid)
    singles = [
        per_sample_gradient_norms(
            lambda t: scores(t, torch.ones(1, n, dtype=torch.bool), y[i : i + 1]), z[i : i + 1, :n]
        )
        for i, n in enumerate(lengths)
    ]
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-10, atol=1e-12)


def test_shared_shift_norm_is_the_gradient_with_respect_to_a_common_offset():
    """d/d delta of l(z + 1 delta^T) = sum of the per-position gradients over the real positions."""
    from mcollapse.analysis.lipschitz import shared_shift_gradient_norms

    W, b = linear_decoder(V=5, T=3, d=4, seed=8)
    z = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([1, 3])
    score = linear_scores(W, b, y)
    _, grad = per_sample_gradient_norms(score, z, return_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    norms = shared_shift_gradient_norms(grad, mask)
    for i in range(2):
        delta = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)
        shift = mask[i : i + 1, :, None].double() * delta  # the padded position is not shifted
        (g,) = torch.autograd.grad(linear_scores(W, b, y[i : i + 1])(z[i : i + 1] + shift)[0], delta)
        assert float(norms[i]) == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-12)
    # a score of the pooled mean alone: l = w . mean_t z_t has shift norm ||w|| whatever the length
    w = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    _, grad = per_sample_gradient_norms(lambda t: (t.mean(1) * w).sum(-1), z, return_grad=True)
    assert np.allclose(shared_shift_gradient_norms(grad, None), 5.0)
