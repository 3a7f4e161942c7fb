"""GMI (Eq. 3): known limits, hand-computed cases, a channel with a closed-form GMI, Theorem 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax

from mcollapse.analysis.gmi import (
    gmi_from_scores,
    gmi_gap,
    split_score_matrix,
    theorem2_rhs,
)
from mcollapse.analysis.lipschitz import diameter, linear_softmax_lipschitz


def test_decoder_that_ignores_z_has_zero_gmi():
    rng = np.random.default_rng(0)
    per_target = rng.normal(-3.0, 1.0, size=50)  # the score depends on y only
    alt = np.repeat(per_target[:, None], 7, axis=1)
    for estimator in ("contrastive", "plugin"):
        result = gmi_from_scores(per_target, alt, estimator=estimator)
        assert result.gmi == pytest.approx(0.0, abs=1e-12)
        assert result.ci_low == pytest.approx(0.0, abs=1e-12) and result.ci_high == pytest.approx(0.0, abs=1e-12)


def test_perfect_decoder_reaches_log_of_the_candidate_count():
    true = np.zeros(40)
    alt = np.full((40, 9), -1e4)
    result = gmi_from_scores(true, alt)
    assert result.gmi == pytest.approx(math.log(10), abs=1e-9)
    assert result.cap == pytest.approx(math.log(10))
    # The plug-in form is uncapped; the paper's floor log(1/|V|) bounds it by log |V|.
    floored = gmi_from_scores(true, alt, estimator="plugin", log_floor=-math.log(32000))
    assert floored.gmi == pytest.approx(math.log(32000))
    with pytest.raises(ValueError, match="finite"):
        gmi_from_scores(true, np.full((40, 9), -np.inf))


def test_hand_computed_intermediate_case():
    true = np.log([0.5, 0.2])
    alt = np.log([[0.25, 0.25], [0.2, 0.6]])
    contrastive = gmi_from_scores(true, alt)
    # sample 1: 0.5 / mean(0.5, 0.25, 0.25) = 1.5; sample 2: 0.2 / mean(0.2, 0.2, 0.6) = 0.6
    np.testing.assert_allclose(contrastive.per_sample, np.log([1.5, 0.6]))
    assert contrastive.gmi == pytest.approx(0.5 * math.log(0.9))
    plugin = gmi_from_scores(true, alt, estimator="plugin")
    np.testing.assert_allclose(plugin.per_sample, np.log([2.0, 0.5]))
    assert plugin.gmi == pytest.approx(0.0, abs=1e-15)
    tilted = gmi_from_scores(true, alt, s=2.0)
    # sample 1 with s = 2: 0.25 / mean(0.25, 0.0625, 0.0625) = 2
    assert tilted.per_sample[0] == pytest.approx(math.log(2.0))
    assert gmi_from_scores(true, alt, s=0.0).gmi == 0.0


def test_closed_form_channel():
    """Z uniform on K symbols, Y = Z, q(y|z) = 1 - eps on the diagonal: GMI = log(K (1 - eps))."""
    K, eps, n, m = 4, 0.2, 3000, 300
    rng = np.random.default_rng(1)
    z = rng.integers(0, K, size=n)
    y = z
    alt_z = rng.integers(0, K, size=(n, m))  # other samples of the same prompt

    def log_q(yv, zv):
        return np.where(yv == zv, math.log(1 - eps), math.log(eps / (K - 1)))

    true = log_q(y, z)
    alt = log_q(y[:, None], alt_z)
    expected = math.log(K * (1 - eps))
    for estimator in ("plugin", "contrastive"):
        result = gmi_from_scores(true, alt, estimator=estimator, seed=3)
        assert result.gmi == pytest.approx(expected, abs=0.02)
        assert result.ci_low - 0.01 <= expected <= result.ci_high + 0.01
        assert result.ci_low < result.gmi < result.ci_high
    small = gmi_from_scores(true, alt[:, :3])
    assert small.gmi < expected  # the contrastive form is pulled toward 0 at small m


def test_split_score_matrix():
    S = np.arange(16.0).reshape(4, 4)
    true, alt = split_score_matrix(S)
    np.testing.assert_array_equal(true, [0.0, 5.0, 10.0, 15.0])
    np.testing.assert_array_equal(alt[1], [4.0, 6.0, 7.0])
    assert alt.shape == (4, 3)
    with pytest.raises(ValueError):
        split_score_matrix(np.zeros((3, 2)))


def test_bootstrap_is_reproducible_and_degenerate_cases():
    rng = np.random.default_rng(2)
    true = rng.normal(size=100)
    alt = rng.normal(size=(100, 5))
    a = gmi_from_scores(true, alt, seed=7)
    b = gmi_from_scores(true, alt, seed=7)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert a.ci_low < a.gmi < a.ci_high
    assert a.as_dict()["n_alternatives"] == 5
    single = gmi_from_scores(true[:1], alt[:1])
    assert math.isnan(single.ci_low) and math.isnan(single.se)
    with pytest.raises(ValueError):
        gmi_from_scores(true, alt[:50])
    with pytest.raises(ValueError):
        gmi_from_scores(true, alt, estimator="nce")


def test_gmi_gap_paired_and_unpaired():
    rng = np.random.default_rng(3)
    n, m = 200, 8
    text_true = rng.normal(0.0, 1.0, size=n) + 2.0
    alt = rng.normal(0.0, 1.0, size=(n, m))
    modal_true = text_true - 1.0
    text = gmi_from_scores(text_true, alt)
    modal = gmi_from_scores(modal_true, alt)
    paired = gmi_gap(modal, text, paired=True)
    unpaired = gmi_gap(modal, text)
    assert paired.gap == pytest.approx(text.gmi - modal.gmi)
    assert paired.gap > 0
    # Pairing removes the item-to-item spread that both conditions share.
    assert paired.ci_high - paired.ci_low < unpaired.ci_high - unpaired.ci_low
    assert paired.ci_low <= paired.gap <= paired.ci_high
    assert paired.as_dict()["abs_gap"] == pytest.approx(abs(paired.gap))

    other_m = gmi_from_scores(text_true, alt[:, :4])
    with pytest.raises(ValueError, match="alternatives"):
        gmi_gap(modal, other_m)
    with pytest.raises(ValueError, match="same items"):
        gmi_gap(modal, gmi_from_scores(text_true[:100], alt[:100]), paired=True)
    with pytest.raises(ValueError, match="estimator"):
        gmi_gap(modal, gmi_from_scores(text_true, alt, estimator="plugin"))


def test_theorem2_rhs_hand_example():
    bound = theorem2_rhs(lipschitz=2.0, w1=0.5, diameter=1.0)
    assert bound.rhs == pytest.approx(1.0 + math.e**2)
    assert bound.prefactor == pytest.approx(1.0 + math.e**2)
    assert bound.direct_term == pytest.approx(1.0)
    assert bound.competition_term == pytest.approx(math.e**2)
    assert bound.log_rhs == pytest.approx(math.log(1.0 + math.e**2))
    assert bound.holds_for(-8.0) and not bound.holds_for(8.5)

    huge = theorem2_rhs(lipschitz=1.0, w1=1.0, diameter=1000.0)  # exp(1000) overflows float64
    assert math.isinf(huge.rhs)
    assert huge.log_rhs == pytest.approx(1000.0)
    assert theorem2_rhs(lipschitz=3.0, w1=0.0, diameter=5.0).rhs == 0.0
    with pytest.raises(ValueError):
        theorem2_rhs(lipschitz=-1.0, w1=1.0, diameter=1.0)


def test_theorem2_holds_for_a_linear_decoder_under_a_translation():
    """Modal = text shifted by delta, so W1 = |delta| exactly; the measured gap respects Eq. 4."""
    rng = np.random.default_rng(4)
    centres = np.array([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
    W, bias = 1.5 * centres, np.zeros(3)
    n, m = 1500, 200
    y = rng.integers(0, 3, size=n)
    z_text = centres[y] + rng.uniform(-0.3, 0.3, size=(n, 2))
    delta = np.array([0.1, -0.05])
    z_modal = z_text + delta

    def estimate(z):
        log_q = log_softmax(z @ W.T + bias, axis=1)  # (n, classes)
        others = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, m))) % n
        return gmi_from_scores(log_q[np.arange(n), y], log_q[others, y[:, None]], estimator="plugin")

    text, modal = estimate(z_text), estimate(z_modal)
    gap = gmi_gap(modal, text, paired=True)
    L = linear_softmax_lipschitz(W)
    D = diameter(np.vstack([z_text, z_modal]))
    bound = theorem2_rhs(lipschitz=L, w1=float(np.linalg.norm(delta)), diameter=D)
    assert bound.holds_for(gap.gap)
    assert text.gmi > 0.5  # the decoder does carry information about y


# ---------------------------------------------------------------------------------------------
# The experiment's wiring: alternatives, the score matrix, W1_conditional, the accessibility gap


def test_alternatives_never_include_the_sample_itself():
    from mcollapse.experiments.gmi import alternatives

    for n, m in ((2, 5), (7, 6), (30, 4)):
        alts = alternatives(n, m, seed=n)
        assert alts.shape == (n, min(m, n - 1))
        for i, row in enumerate(alts):
            assert i not in row and len(set(row.tolist())) == len(row) and row.min() >= 0 and row.max() < n


class _EncodingDecoder:
    """answer_scores(z_j, [y_i, ...]) = 1000 i + j: the score names the pair it was computed for."""

    def answer_scores(self, z, answers):
        import torch

        j = float(z.reshape(-1)[0])
        return torch.tensor([1000.0 * a[0] + j for a in answers], dtype=torch.float64)


def test_candidate_scores_put_each_pair_where_it_belongs():
    from types import SimpleNamespace

    from mcollapse.experiments.gmi import alternatives
    from mcollapse.pipeline.decoder_side import candidate_scores

    n = 9
    zs = [np.full((1 + j % 3, 2), float(j)) for j in range(n)]  # z_j carries j; lengths vary
    answers = [[i] for i in range(n)]  # y_i carries i
    candidates = np.concatenate([np.arange(n)[:, None], alternatives(n, 4, seed=1)], axis=1)
    inputs = SimpleNamespace(decoder=_EncodingDecoder())
    scores = candidate_scores(inputs.decoder, zs, answers, candidates, "test", chunk=2)
    np.testing.assert_array_equal(scores, 1000.0 * np.arange(n)[:, None] + candidates)


def test_conditional_w1_is_the_mean_distance_to_each_text_point():
    from mcollapse.analysis.gmi import conditional_w1_to_points

    modal = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    text = np.array([[3.0, 4.0], [1.0, 1.0], [2.0, -1.0]])
    assert conditional_w1_to_points(modal, text) == pytest.approx((5.0 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="pair"):
        conditional_w1_to_points(modal, text[:2])


def test_accessibility_gap_only_when_probe_and_gmi_concern_the_same_variable():
    from mcollapse.experiments.gmi import accessibility_gaps

    info = {"modal": {"information": 2.0}, "text": {"information": 2.5}}
    gmis = {"modal": 0.5, "text": 1.5}
    gaps, reason = accessibility_gaps("transcript", info, gmis)
    assert gaps == {"modal": 1.5, "text": 1.0} and reason is None
    gaps, reason = accessibility_gaps("speaker", info, gmis)
    assert gaps == {} and "speaker" in reason and "transcript" in reason


class _Recorder:
    """What a sharded pass asks of its run recorder: counts and timed stages."""

    def __init__(self):
        self.counts = {}

    def stage(self, name):
        import contextlib

        return contextlib.nullcontext()


class _RefusingDecoder:
    def answer_scores(self, z, answers):
        raise AssertionError("a cached score was recomputed")


def test_cached_candidate_scores_resume_and_are_read_back(tmp_path):
    from types import SimpleNamespace

    from mcollapse.experiments.gmi import alternatives
    from mcollapse.pipeline.decoder_side import cached_candidate_scores

    n = 11
    zs = [np.full((1 + j % 3, 2), float(j)) for j in range(n)]
    answers = [[i] for i in range(n)]
    candidates = np.concatenate([np.arange(n)[:, None], alternatives(n, 4, seed=2)], axis=1)
    expected = 1000.0 * np.arange(n)[:, None] + candidates
    inputs = SimpleNamespace(decoder=_EncodingDecoder(), decoder_key="k", family=SimpleNamespace(dtype="float32"),
                             cache_dir=tmp_path)
    key = {"input": "modal", "ids": "x"}
    first = cached_candidate_scores(inputs, _Recorder(), zs, answers, candidates, "scores_modal", key, group=3)
    np.testing.assert_array_equal(first, expected)

    shards = sorted((tmp_path / "gmi_scores").rglob("batch-*.npz"))
    assert len(shards) == 4  # 11 representations, 3 a shard
    shards[1].unlink()  # an interrupted pass: one shard missing
    rec = _Recorder()
    again = cached_candidate_scores(inputs, rec, zs, answers, candidates, "scores_modal", key, group=3)
    np.testing.assert_array_equal(again, expected)
    assert rec.counts["scores_modal_batches_from_cache"] == 3

    inputs.decoder = _RefusingDecoder()
    np.testing.assert_array_equal(
        cached_candidate_scores(inputs, _Recorder(), zs, answers, candidates, "scores_modal", key, group=3), expected)
    with pytest.raises(AssertionError, match="recomputed"):  # another candidate draw is another pass
        cached_candidate_scores(inputs, _Recorder(), zs, answers, candidates[:, [0, 2, 1, 3, 4]], "scores_modal",
                                key, group=3)
