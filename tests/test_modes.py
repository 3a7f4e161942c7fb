"""Modes: planted MS/TA directions are recovered, rho is the Rayleigh quotient, artifacts round-trip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from mcollapse.analysis.modes import (
    FORMAT,
    eigenbasis,
    gradient_isotropy,
    load_basis,
    mode_alignment,
    mode_gradient_magnitudes,
    save_basis,
)
from mcollapse.errors import UserError

N_PLANTED = 20


class Planted:
    """Modal and text clouds sharing an orthonormal basis Q, with chosen variances per direction.

    The first N_PLANTED directions carry modal variance 100 * 0.7^j (gaps wide enough that sampling
    noise cannot mix neighbouring modes); every third one has no text variance at all (MS, rho 0),
    the others text variance rho_true * lambda with rho_true in [0.6, 1.4] (TA). The remaining
    directions hold a little equal noise in both clouds. The clouds have unrelated, large means.
    """

    def __init__(self, n: int = 3000, m: int = 3000, d: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        self.lam = 100 * 0.7 ** np.arange(N_PLANTED)
        self.rho_true = np.where(np.arange(N_PLANTED) % 3 == 0, 0.0, rng.uniform(0.6, 1.4, N_PLANTED))
        noise = np.full(d - N_PLANTED, 1e-3)
        modal_var = np.concatenate([self.lam, noise])
        text_var = np.concatenate([self.lam * self.rho_true, noise])
        self.total_variance = modal_var.sum()
        self.X = (rng.normal(size=(n, d)) * np.sqrt(modal_var)) @ self.Q.T + 5 * rng.normal(size=d)
        self.T = (rng.normal(size=(m, d)) * np.sqrt(text_var)) @ self.Q.T + 50 * rng.normal(size=d)

    @property
    def directions(self) -> np.ndarray:
        return self.Q[:, :N_PLANTED].T

    @property
    def ms(self) -> np.ndarray:
        return self.rho_true < 0.5


@pytest.fixture(scope="module")
def planted():
    return Planted()


@pytest.fixture(scope="module")
def fitted(planted):
    basis = eigenbasis(planted.X, n_modes=N_PLANTED)
    return basis, mode_alignment(basis, planted.T)


def test_planted_directions_and_labels_are_recovered(planted, fitted):
    basis, alignment = fitted
    assert basis.n_modes == N_PLANTED
    cosines = np.abs(np.sum(basis.vectors * planted.directions, axis=1))
    assert cosines.min() > 0.97
    np.testing.assert_allclose(basis.eigenvalues, planted.lam, rtol=0.15)
    np.testing.assert_array_equal(alignment.is_ms, planted.ms)
    assert list(alignment.labels) == ["MS" if ms else "TA" for ms in planted.ms]
    assert np.all(alignment.rho[planted.ms] < 0.06)
    ta = ~planted.ms
    np.testing.assert_allclose(alignment.rho[ta], planted.rho_true[ta], rtol=0.15)
    assert alignment.rho_0 < 0.06  # mode 0 is planted MS
    assert alignment.mean_rho_top10 == pytest.approx(planted.rho_true[:10].mean(), abs=0.05)
    assert alignment.n_ms == planted.ms.sum() and alignment.n_ta == (~planted.ms).sum()


def test_ms_variance_shares(planted, fitted):
    basis, alignment = fitted
    assert alignment.ms_variance_share == pytest.approx(
        basis.eigenvalues[alignment.is_ms].sum() / basis.eigenvalues.sum(), rel=1e-12
    )
    planted_share = planted.lam[planted.ms].sum() / planted.lam.sum()
    assert alignment.ms_variance_share == pytest.approx(planted_share, abs=0.03)
    assert alignment.ms_share_of_total == pytest.approx(
        planted.lam[planted.ms].sum() / planted.total_variance, abs=0.03
    )
    assert basis.total_variance == pytest.approx(np.var(planted.X, axis=0, ddof=1).sum(), rel=1e-10)
    summary = alignment.summary()
    assert summary["mode0_variance_share"] == pytest.approx(basis.explained_variance_ratio[0])


def test_threshold_sensitivity(planted, fitted):
    _, alignment = fitted
    assert alignment.thresholds == (0.1, 0.25, 0.5, 0.75, 0.9)
    counts = [alignment.sensitivity[t] for t in alignment.thresholds]
    assert counts == sorted(counts)
    # Planted rho are 0 or >= 0.6, so every threshold up to 0.5 finds exactly the planted MS modes.
    for threshold in (0.1, 0.25, 0.5):
        assert alignment.sensitivity[threshold] == planted.ms.sum()
    assert alignment.sensitivity_variance_share[0.5] == alignment.ms_variance_share
    summary = alignment.summary()
    assert summary["n_ms@0.25"] == planted.ms.sum()
    assert alignment.sensitivity[0.9] == summary["n_ms@0.9"] == np.sum(alignment.rho < 0.9)
    other = mode_alignment(fitted[0], planted.T, ms_threshold=0.3, thresholds=(0.9,))
    assert other.thresholds == (0.3, 0.9)


def test_rho_is_the_rayleigh_quotient_of_the_text_covariance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 12)) * np.linspace(3, 0.5, 12)
    T = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)) + 7.0
    basis = eigenbasis(X, n_modes=6)
    values, vectors = np.linalg.eigh(np.cov(X.T))
    np.testing.assert_allclose(basis.eigenvalues, values[::-1][:6], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(basis.vectors * vectors[:, ::-1][:, :6].T, axis=1)), 1.0, atol=1e-8)
    sigma_t = np.cov(T.T)
    expected = np.einsum("kd,de,ke->k", basis.vectors, sigma_t, basis.vectors) / basis.eigenvalues
    alignment = mode_alignment(basis, T)
    np.testing.assert_allclose(alignment.rho, expected, rtol=1e-10)
    # Text is taken around its own mean: shifting it changes nothing.
    np.testing.assert_allclose(mode_alignment(basis, T + 100.0).rho, alignment.rho, rtol=1e-9)


def test_fewer_samples_than_dimensions_keeps_only_real_modes(caplog):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 200))
    with caplog.at_level(logging.WARNING, logger="mcollapse.analysis.modes"):
        basis = eigenbasis(X, n_modes=100)
    assert basis.n_modes == 39  # rank of 40 centred samples
    assert "only 39 of the 100 requested modes" in caplog.text
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(39), atol=1e-10)
    values = np.linalg.eigvalsh(np.cov(X.T))[::-1]
    np.testing.assert_allclose(basis.eigenvalues, values[:39], rtol=1e-8)
    assert basis.eigenvalues.min() > 1e-3 * basis.eigenvalues.max()
    np.testing.assert_allclose(basis.eigenvalues.sum(), basis.total_variance, rtol=1e-10)
    rho = mode_alignment(basis, rng.normal(size=(30, 200))).rho
    assert np.all(np.isfinite(rho)) and rho.max() < 50


@pytest.mark.parametrize("shape", [(30, 80), (80, 30)])
def test_basis_agrees_with_a_direct_svd(shape):
    rng = np.random.default_rng(11)
    X = rng.normal(size=shape) * np.geomspace(10, 0.01, shape[1]) + 3.0
    basis = eigenbasis(X, n_modes=20)
    _, singular, vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(basis.eigenvalues, singular[:20] ** 2 / (shape[0] - 1), rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(basis.vectors * vt[:20], axis=1)), 1.0, atol=1e-9)


def test_rank_deficient_data_keeps_only_its_span():
    rng = np.random.default_rng(12)
    span = np.linalg.qr(rng.normal(size=(30, 5)))[0].T
    X = rng.normal(size=(200, 5)) @ span + 1.0
    basis = eigenbasis(X, n_modes=10)
    assert basis.n_modes == 5
    np.testing.assert_allclose(np.linalg.svd(basis.vectors @ span.T, compute_uv=False), 1.0, atol=1e-10)


def test_basis_is_deterministic_under_row_order_and_sign(planted):
    first = eigenbasis(planted.X[:500], n_modes=8)
    again = eigenbasis(planted.X[:500][np.random.default_rng(3).permutation(500)], n_modes=8)
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-8)
    largest = first.vectors[np.arange(8), np.argmax(np.abs(first.vectors), axis=1)]
    assert np.all(largest > 0)
    coordinates = first.project(planted.X[:500])
    np.testing.assert_allclose(coordinates.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(coordinates.var(axis=0, ddof=1), first.eigenvalues, rtol=1e-10)


def test_save_load_round_trip(tmp_path: Path, fitted):
    basis, alignment = fitted
    meta = {"model": "tiny", "dataset": "synthetic", "hook": "adapter_output", "path": Path("a/b")}
    target = save_basis(tmp_path / "modes" / "basis.npz", basis, alignment, meta)
    assert [p.name for p in target.parent.iterdir()] == ["basis.npz"]  # no temporary left behind
    loaded, loaded_alignment, loaded_meta = load_basis(target)
    for name in ("mean", "vectors", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(basis, name))
    assert (loaded.total_variance, loaded.n_samples) == (basis.total_variance, basis.n_samples)
    np.testing.assert_array_equal(loaded_alignment.rho, alignment.rho)
    np.testing.assert_array_equal(loaded_alignment.labels, alignment.labels)
    assert loaded_alignment.summary() == alignment.summary()
    assert loaded_meta == {**meta, "path": str(Path("a/b"))}
    with np.load(target) as raw:
        assert str(raw["format"]) == FORMAT and list(raw["labels"]) == list(alignment.labels)

    bare = save_basis(tmp_path / "bare.npz", basis)
    assert load_basis(bare)[1] is None and load_basis(bare)[2] == {}


def test_load_rejects_missing_and_foreign_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_basis(tmp_path / "absent.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="format"):
        load_basis(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an eigenbasis file"):
        load_basis(tmp_path / "junk.npz")


def test_invalid_inputs_are_rejected(fitted):
    basis, _ = fitted
    with pytest.raises(ValueError, match="same space"):
        mode_alignment(basis, np.zeros((10, basis.dim + 1)))
    with pytest.raises(ValueError, match="non-finite"):
        eigenbasis(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="no variance"):
        eigenbasis(np.ones((5, 3)))
    with pytest.raises(ValueError, match="mask"):
        mode_gradient_magnitudes(np.zeros((2, basis.dim)), basis, mask=np.ones((2, 1)))


def test_isotropic_gradients_show_no_preference(fitted):
    basis, alignment = fitted
    grads = np.random.default_rng(4).normal(size=(2000, basis.dim))
    magnitudes = mode_gradient_magnitudes(grads, basis)
    for statistic in ("mean", "rms"):
        result = gradient_isotropy(magnitudes, alignment, statistic=statistic)
        assert result.ratio == pytest.approx(1.0, abs=0.05)
        assert result.spearman_p > 0.01
    assert result.summary()["n_ms"] == alignment.n_ms
    assert result.summary()["g_ta_over_g_ms"] == result.ratio


def test_gradients_on_ta_modes_are_detected(fitted):
    basis, alignment = fitted
    rng = np.random.default_rng(5)
    ta_vectors = basis.vectors[~alignment.is_ms]
    grads = 10 * rng.normal(size=(500, ta_vectors.shape[0])) @ ta_vectors + rng.normal(size=(500, basis.dim))
    result = gradient_isotropy(mode_gradient_magnitudes(grads, basis), alignment)
    assert result.ratio > 5
    assert result.spearman_r > 0.5 and result.spearman_p < 1e-3


def test_per_position_gradients_do_not_cancel(fitted):
    basis, _ = fitted
    u = basis.vectors[0]
    grads = np.zeros((2, 3, basis.dim))
    grads[0, 0], grads[0, 1] = u, -u  # opposite pushes at two positions: the pooled gradient is zero
    grads[1, 0], grads[1, 2] = 2 * u, 5 * u  # position 2 is padding
    mask = np.array([[True, True, True], [True, True, False]])
    magnitudes = mode_gradient_magnitudes(grads, basis, mask=mask)
    np.testing.assert_allclose(magnitudes[:, 0], [np.sqrt(2), 2.0], atol=1e-12)
    np.testing.assert_allclose(magnitudes[:, 1:], 0.0, atol=1e-12)
    pooled = mode_gradient_magnitudes(grads[:1].mean(axis=1), basis)
    assert pooled[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_trace_normalised_rho_is_blind_to_a_global_scale(planted):
    """Text at 1/10 of the planted scale: the paper's rho calls every mode MS, the trace-normalised
    rho_k * tr(Sigma_M) / tr(Sigma_T) recovers the planted split, and `trace` lets it decide."""
    basis = eigenbasis(planted.X, n_modes=N_PLANTED)
    small_text = planted.T * 0.1
    text_trace = np.var(small_text, axis=0, ddof=1).sum()
    plain = mode_alignment(basis, small_text)
    assert plain.n_ms == N_PLANTED and plain.rho_normalization == "none"
    np.testing.assert_allclose(plain.rho_normalised, plain.rho * basis.total_variance / text_trace, rtol=1e-10)
    scaled = mode_alignment(basis, small_text, rho_normalization="trace")
    np.testing.assert_array_equal(scaled.rho, plain.rho)  # the paper's rho is still reported as is
    np.testing.assert_array_equal(scaled.is_ms, planted.ms)
    assert scaled.sensitivity[0.5] == planted.ms.sum() and scaled.n_ta == (~planted.ms).sum()
    summary = scaled.summary()
    assert summary["rho_normalization"] == "trace"
    assert summary["trace_ratio"] == pytest.approx(basis.total_variance / text_trace)
    assert summary["rho_normalised_0"] == pytest.approx(scaled.rho_normalised[0])
    # Scaling the text changes rho by the square of the scale and the normalised rho not at all.
    same = mode_alignment(basis, planted.T, rho_normalization="trace")
    np.testing.assert_allclose(same.rho, plain.rho * 100, rtol=1e-9)
    np.testing.assert_allclose(same.rho_normalised, scaled.rho_normalised, rtol=1e-9)
    np.testing.assert_array_equal(same.is_ms, scaled.is_ms)
    with pytest.raises(ValueError, match="rho_normalization"):
        mode_alignment(basis, planted.T, rho_normalization="max")


def test_normalised_rho_and_its_choice_survive_save_and_load(tmp_path: Path, planted):
    basis = eigenbasis(planted.X, n_modes=N_PLANTED)
    alignment = mode_alignment(basis, planted.T * 0.1, rho_normalization="trace")
    _, loaded, _ = load_basis(save_basis(tmp_path / "b.npz", basis, alignment))
    assert loaded.rho_normalization == "trace"
    np.testing.assert_array_equal(loaded.rho_normalised, alignment.rho_normalised)
    np.testing.assert_array_equal(loaded.is_ms, alignment.is_ms)
    assert loaded.summary() == alignment.summary()


def test_empty_classes_are_named(planted):
    basis = eigenbasis(planted.X, n_modes=N_PLANTED)
    assert mode_alignment(basis, planted.T).empty_classes == []
    assert mode_alignment(basis, planted.T * 0.1).empty_classes == ["TA"]
    assert mode_alignment(basis, planted.T * 1000).empty_classes == ["MS"]


class _PlantedInputs:
    """The parts of DecoderInputs that the shared basis reads: pooled modal sequences (one position
    each) and each sample's text embedding, from the planted clouds, text at 1/10 of the scale."""

    def __init__(self, planted, cache_dir: Path, n: int = 400):
        from types import SimpleNamespace

        from mcollapse.extraction.sequences import Sequences

        ids = [f"s{i}" for i in range(n)]
        self.sequences = Sequences(ids, [planted.X[i][None] for i in range(n)], "planted")
        self.texts = {i: "text" for i in ids}
        self.text_rows = dict(zip(ids, planted.T[:n] * 0.1))
        self.family = SimpleNamespace(cfg=SimpleNamespace(name="toy", lora=None))
        self.dataset = {"name": "planted", "fingerprint": "0"}
        self.cache_dir = cache_dir
        self.decoder_key = "planted"

    def with_text(self, ids=None):
        return list(ids or self.sequences.ids)

    def text_sequence(self, sample_id):
        return self.text_rows[sample_id][None]


def test_the_shared_basis_is_keyed_by_its_rho_normalization(tmp_path: Path, planted):
    from mcollapse.pipeline.decoder_side import modes
    from mcollapse.report.output import RunRecorder

    inputs, rec = _PlantedInputs(planted, tmp_path / "cache"), RunRecorder(tmp_path / "run", {})
    plain = modes(inputs, rec, N_PLANTED, 0.5, rho_normalization="none")
    scaled = modes(inputs, rec, N_PLANTED, 0.5, rho_normalization="trace")
    assert plain.key != scaled.key and plain.path != scaled.path
    assert plain.alignment.empty_classes == ["TA"] and plain.alignment.rho_normalization == "none"
    np.testing.assert_array_equal(scaled.alignment.is_ms, planted.ms)
    assert load_basis(scaled.path)[1].rho_normalization == "trace"
    again = modes(inputs, rec, N_PLANTED, 0.5, rho_normalization="trace")  # read back from the cache
    assert again.path == scaled.path and again.alignment.summary() == scaled.alignment.summary()
    with pytest.raises(UserError, match="rho_normalization"):
        modes(inputs, rec, N_PLANTED, 0.5, rho_normalization="l2")


def test_gradient_pass_recovers_a_planted_gradient_field_along_the_modes(tmp_path: Path, fitted):
    """gradproj's wiring (gradient pass, mode projections, isotropy) on a toy decoder with
    log q = 1/2 sum_t z_t^T M z_t, M = sum_k c_k u_k u_k^T: the gradient at position t is M z_t, so its
    magnitude along mode k is |c_k| ||Z u_k|| (per position) and |c_k| |<u_k, mean_t z_t>| (the
    reference's mean gradient); with c = 3 on TA modes and 1 on MS modes, g_TA / g_MS follows."""
    from types import SimpleNamespace

    import torch

    from mcollapse.extraction.sequences import Sequences
    from mcollapse.pipeline.decoder_side import DecoderInputs, Modes, gradients
    from mcollapse.report.output import RunRecorder

    basis, alignment = fitted
    c = np.where(alignment.is_ms, 1.0, 3.0)
    field = torch.as_tensor((basis.vectors.T * c) @ basis.vectors, dtype=torch.float32)

    class ToyDecoder:
        def scores(self, batch, z):
            masked = z * batch.z_mask[..., None]
            return 0.5 * torch.einsum("btd,de,bte->b", masked, field, masked)

    rng = np.random.default_rng(6)
    ids = [f"s{i}" for i in range(5)]
    arrays = [rng.normal(size=(T, basis.dim)).astype(np.float32) for T in (4, 2, 6, 3, 5)]
    family = SimpleNamespace(cfg=SimpleNamespace(name="toy", lora=None), dtype=torch.float32, placeholder_id=7,
                             pad_token_id=0, prompt_token_parts=lambda: ([1, 2], [3]))
    inputs = DecoderInputs(family, ToyDecoder(), Sequences(ids, arrays, "toy"), {}, {"name": "toy"},
                           tmp_path / "cache")
    mode_set = Modes(basis, alignment, tmp_path / "basis.npz", "planted", [])
    target = SimpleNamespace(name="reference", reduction="sum")
    grads = gradients(inputs, RunRecorder(tmp_path / "run", {}), ids, target, 2, mode_set)

    along = [a.astype(np.float64) @ basis.vectors.T for a in arrays]  # (T, k) per sample
    expected = np.stack([c * np.sqrt((x**2).sum(axis=0)) for x in along])
    np.testing.assert_allclose(grads.mode_magnitudes, expected, rtol=1e-4)
    np.testing.assert_allclose(grads.mean_grad_magnitudes, np.stack([c * np.abs(x.mean(axis=0)) for x in along]),
                               rtol=1e-3, atol=1e-5)
    iso = gradient_isotropy(grads.mode_magnitudes, alignment)
    g_k = expected.mean(axis=0)
    assert iso.g_ta == pytest.approx(g_k[~alignment.is_ms].mean(), rel=1e-4)
    assert iso.g_ms == pytest.approx(g_k[alignment.is_ms].mean(), rel=1e-4)
    np.testing.assert_allclose(grads.norms, [np.linalg.norm(x * c) for x in along], rtol=1e-4)
