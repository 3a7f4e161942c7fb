"""Probes: same optimum as scikit-learn, honest baselines and bookkeeping, known-answer accuracy."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler

from mcollapse.analysis.logistic import fit_logistic_regression
from mcollapse.analysis.probes import (
    ProbeOutcome,
    ProbeSettings,
    _stratified_split,
    run_probe,
    run_probes,
)

TIGHT = dict(max_iter=20000, tol=1e-9)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matrix products are faster on one thread, and timings then do not depend on load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def clustered_data(n: int, d: int, n_classes: int, separation: float, seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.arange(n) % n_classes)
    centres = rng.normal(size=(n_classes, d)) * separation
    mixing = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    X = (centres[codes] + rng.normal(size=(n, d))) @ mixing + rng.normal(size=d) * 3.0
    return X, codes


def sklearn_reference(X, codes, C, seed, train_size=0.8):
    splitter = StratifiedShuffleSplit(n_splits=1, train_size=train_size, random_state=seed)
    train, test = next(splitter.split(X, codes))
    scaler = StandardScaler().fit(X[train])
    model = LogisticRegression(C=C, max_iter=20000, tol=1e-10)
    model.fit(scaler.transform(X[train]), codes[train])
    return model, scaler.transform(X[train]), scaler.transform(X[test]), train, test


@pytest.mark.parametrize(
    ("n", "d", "n_classes", "C"),
    [(200, 16, 2, 1.0), (400, 64, 5, 0.5), (600, 128, 10, 0.1), (300, 32, 3, 3.0)],
)
def test_fit_matches_sklearn_coefficients_and_probabilities(n, d, n_classes, C):
    X, codes = clustered_data(n, d, n_classes, separation=0.4, seed=n + d)
    model, train_X, test_X, train, test = sklearn_reference(X, codes, C, seed=42)

    fit = fit_logistic_regression(
        torch.from_numpy(train_X)[None], torch.from_numpy(codes[train])[None], n_classes, C,
        **TIGHT,
    )
    assert bool(fit.converged[0]) and float(fit.grad_max[0]) <= TIGHT["tol"]
    weights, intercepts = fit.weights[0].numpy(), fit.intercepts[0].numpy()
    if n_classes == 2:  # binomial model: one weight vector, class-0 logit pinned at 0
        assert np.all(weights[:, 0] == 0) and intercepts[0] == 0
        np.testing.assert_allclose(weights[:, 1], model.coef_[0], atol=1e-5)
        np.testing.assert_allclose(intercepts[1], model.intercept_[0], atol=1e-5)
    else:
        np.testing.assert_allclose(weights.T, model.coef_, atol=1e-5)
        centred = model.intercept_ - model.intercept_.mean()
        np.testing.assert_allclose(intercepts, centred, atol=1e-5)
    probabilities = fit.predict_proba(torch.from_numpy(test_X)[None])[0].numpy()
    np.testing.assert_allclose(probabilities, model.predict_proba(test_X), atol=1e-6)
    np.testing.assert_array_equal(
        fit.predict(torch.from_numpy(test_X)[None])[0].numpy(), model.predict(test_X)
    )


@pytest.mark.parametrize("weight_decay", [None, 1e-3])
def test_run_probe_accuracies_equal_sklearn_per_seed(weight_decay):
    X, codes = clustered_data(300, 24, 4, separation=0.35, seed=7)
    # A constant feature and one riding on a huge offset, as pooled activations can have.
    X = np.hstack([X, np.full((300, 1), 7.5), X[:, :1] + 1e6])
    labels = [f"class_{code}" for code in codes]
    settings = ProbeSettings(
        C=None if weight_decay else 1.0, weight_decay=weight_decay, **TIGHT
    )
    outcome = run_probe(X, labels, settings)

    assert [row["seed"] for row in outcome.per_seed] == [42, 43, 44, 45, 46]
    for row in outcome.per_seed:
        n_train = row["n_train"]
        expected_C = 1.0 / (weight_decay * n_train) if weight_decay else 1.0
        assert row["C"] == pytest.approx(expected_C, rel=1e-12)
        model, _, test_X, _, test = sklearn_reference(X, codes, expected_C, seed=row["seed"])
        assert row["n_test"] == len(test) and row["converged"]
        assert row["accuracy"] == model.score(test_X, codes[test])
        expected_loss = log_loss(codes[test], model.predict_proba(test_X), labels=model.classes_)
        assert row["log_loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)
    counts = np.bincount(codes) / len(codes)
    assert outcome.label_entropy == pytest.approx(-(counts * np.log(counts)).sum())
    assert outcome.information == pytest.approx(outcome.label_entropy - outcome.mean("log_loss"))
    if weight_decay:
        assert outcome.per_seed[0]["C"] == pytest.approx(1.0 / (weight_decay * 240))


def test_batching_does_not_change_a_fit():
    problems = [clustered_data(240, 20, 3, separation=0.5, seed=seed) for seed in range(3)]
    X = torch.stack([torch.from_numpy(StandardScaler().fit_transform(x)) for x, _ in problems])
    y = torch.stack([torch.from_numpy(codes) for _, codes in problems])
    together = fit_logistic_regression(X, y, 3, 1.0, max_iter=500, tol=1e-8)
    for index in range(3):
        alone = fit_logistic_regression(X[index : index + 1], y[index : index + 1], 3, 1.0,
                                        max_iter=500, tol=1e-8)
        # Equal up to rounding: a batched matrix product may sum in another order.
        assert abs(int(alone.n_iter[0]) - int(together.n_iter[index])) <= 1
        torch.testing.assert_close(alone.weights[0], together.weights[index], rtol=0, atol=1e-8)


def test_class_missing_from_training_is_never_predicted_and_rest_matches_sklearn():
    X, codes = clustered_data(150, 8, 3, separation=0.6, seed=3)
    X = StandardScaler().fit_transform(X)
    present = codes != 1  # class 1 absent: scikit-learn would see a binary problem
    fit = fit_logistic_regression(
        torch.from_numpy(X[present])[None], torch.from_numpy(codes[present])[None], 3, 1.0, **TIGHT
    )
    predicted = fit.predict(torch.from_numpy(X)[None])[0].numpy()
    assert not np.any(predicted == 1)
    model = LogisticRegression(C=1.0, max_iter=20000, tol=1e-10).fit(X[present], codes[present])
    probabilities = fit.predict_proba(torch.from_numpy(X)[None])[0].numpy()
    np.testing.assert_allclose(probabilities[:, [0, 2]], model.predict_proba(X), atol=1e-6)
    assert np.all(probabilities[:, 1] == 0)


def test_planted_linear_signal_reaches_bayes_accuracy():
    """Labels drawn from softmax(X W): the logistic model is exact, so probes get near Bayes."""
    rng = np.random.default_rng(11)
    d, n_classes = 10, 3
    true_map = rng.normal(size=(d, n_classes)) * 0.8

    def sample(n):
        X = rng.normal(size=(n, d))
        logits = X @ true_map
        codes = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)  # = softmax sampling
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        return X, codes, probabilities.max(1).mean()

    _, _, bayes_accuracy = sample(200_000)
    X, codes, _ = sample(2000)
    outcome = run_probe(X, [str(code) for code in codes], ProbeSettings())
    assert 0.6 < bayes_accuracy < 0.9
    assert abs(outcome.mean("accuracy") - bayes_accuracy) < 0.04
    assert all(row["converged"] for row in outcome.per_seed)


def test_pure_noise_is_at_chance():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(800, 20))
    labels = [str(code) for code in rng.permutation(np.arange(800) % 4)]
    outcome = run_probe(X, labels, ProbeSettings())
    assert outcome.chance == 0.25 and outcome.n_classes == 4
    assert abs(outcome.mean("accuracy") - 0.25) < 0.05
    assert abs(outcome.mean("balanced_accuracy") - 0.25) < 0.05


def test_majority_baseline_dropped_classes_and_missing_labels():
    rng = np.random.default_rng(0)
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10 + ["rare"] + [None] * 7
    X = rng.normal(size=(len(labels), 5))
    outcome = run_probe(X, labels, ProbeSettings())
    assert outcome.skipped_reason is None
    assert outcome.n_used == 100
    assert outcome.dropped_classes == {"rare": 1}
    assert outcome.n_classes == 3
    assert outcome.chance == pytest.approx(1 / 3)
    assert outcome.majority == pytest.approx(0.6)
    assert {row["n_train"] + row["n_test"] for row in outcome.per_seed} == {100}


def test_too_few_samples_or_one_class_is_skipped_with_a_reason():
    X = np.random.default_rng(1).normal(size=(30, 4))
    few = run_probe(X[:15], ["a", "b", "c"] * 5, ProbeSettings())
    assert few.skipped_reason and "min_samples=20" in few.skipped_reason
    assert few.per_seed == [] and math.isnan(few.mean("accuracy"))
    one_class = run_probe(X, ["a"] * 29 + ["b"], ProbeSettings())
    assert one_class.skipped_reason and "needs 2" in one_class.skipped_reason
    assert one_class.dropped_classes == {"b": 1}
    all_missing = run_probe(X, [None] * 30, ProbeSettings())
    assert all_missing.skipped_reason and all_missing.n_used == 0


def test_std_is_the_sample_std_across_seeds():
    rows = [{"accuracy": value} for value in (0.5, 0.6, 0.7, 0.8, 0.9)]
    outcome = ProbeOutcome(rows, n_classes=2, chance=0.5, majority=0.5, dropped_classes={},
                           n_used=100)
    assert outcome.std("accuracy") == pytest.approx(np.std([0.5, 0.6, 0.7, 0.8, 0.9], ddof=1))
    assert outcome.mean("accuracy") == pytest.approx(0.7)
    assert math.isnan(ProbeOutcome(rows[:1], 2, 0.5, 0.5, {}, 100).std("accuracy"))


def test_seed_splits_are_sklearn_stratified_splits_and_differ():
    codes = np.repeat(np.arange(5), 40)
    splits = {seed: _stratified_split(codes, 0.8, seed) for seed in (42, 43, 44, 45, 46)}
    for seed, split in splits.items():
        splitter = StratifiedShuffleSplit(n_splits=1, train_size=0.8, random_state=seed)
        train, test = next(splitter.split(np.zeros((200, 1)), codes))
        np.testing.assert_array_equal(split.test, np.sort(test))
        np.testing.assert_array_equal(split.train, np.sort(train))
        assert np.bincount(codes[split.test]).tolist() == [8] * 5
    test_sets = {tuple(split.test) for split in splits.values()}
    assert len(test_sets) == 5


def test_hooks_share_splits_and_may_differ_in_width():
    X, codes = clustered_data(200, 12, 3, separation=0.5, seed=2)
    labels = [str(code) for code in codes]
    outcomes = run_probes(
        {"a": X, "a_again": X.copy(), "wider": np.hstack([X, X[:, ::-1]])}, labels, ProbeSettings()
    )
    for row_a, row_b in zip(outcomes["a"].per_seed, outcomes["a_again"].per_seed):
        same_fit = ("seed", "n_train", "n_test", "accuracy", "macro_f1", "balanced_accuracy")
        assert {key: row_a[key] for key in same_fit} == {key: row_b[key] for key in same_fit}
    assert len(outcomes["wider"].per_seed) == 5


def test_hooks_batched_together_give_the_one_at_a_time_result(monkeypatch):
    """Accelerators fit all hooks as one batch; the CPU path fits them one by one."""
    from mcollapse.analysis import probes

    features = {f"hook_{i}": clustered_data(240, 16, 4, 0.3 + 0.1 * i, seed=i)[0] for i in range(3)}
    codes = clustered_data(240, 16, 4, 0.3, seed=0)[1]
    labels = [str(code) for code in codes]
    alone = run_probes(features, labels, ProbeSettings(tol=1e-8))
    monkeypatch.setattr(probes, "_hook_batches", lambda matrices, n_rows, device: [list(matrices)])
    together = run_probes(features, labels, ProbeSettings(tol=1e-8))
    for hook in features:
        assert together[hook].values("accuracy").tolist() == alone[hook].values("accuracy").tolist()
        assert all(row["converged"] for row in together[hook].per_seed)


def test_small_classes_enlarge_the_test_split(caplog):
    codes = np.repeat(np.arange(10), 3)  # 30 samples: 20 % would be 6 test rows for 10 classes
    X = np.random.default_rng(4).normal(size=(30, 6)) + codes[:, None]
    with caplog.at_level(logging.WARNING, logger="mcollapse.analysis.probes"):
        outcome = run_probe(X, [str(code) for code in codes], ProbeSettings())
    assert {row["n_test"] for row in outcome.per_seed} == {10}
    assert "split changed to 20 train / 10 test" in caplog.text


def test_class_absent_from_a_train_split_still_fits():
    """With a small train_size a two-member class can miss a seed's train split entirely."""
    rng = np.random.default_rng(8)
    labels = ["a"] * 40 + ["b"] * 40 + ["pair"] * 2
    X = rng.normal(size=(len(labels), 4)) + np.array([0.0] * 40 + [2.0] * 40 + [4.0] * 2)[:, None]
    outcome = run_probe(X, labels, ProbeSettings(train_size=0.3))
    assert outcome.n_classes == 3 and len(outcome.per_seed) == 5
    assert all(row["converged"] and 0.5 < row["accuracy"] <= 1 for row in outcome.per_seed)


def test_non_convergence_is_reported(caplog):
    X, codes = clustered_data(200, 30, 4, separation=0.5, seed=9)
    with caplog.at_level(logging.WARNING, logger="mcollapse.analysis.probes"):
        outcome = run_probe(X, [str(code) for code in codes], ProbeSettings(max_iter=3))
    assert outcome.n_not_converged == 5
    assert all(row["n_iter"] == 3 and row["grad_max"] > 1e-6 for row in outcome.per_seed)
    assert "5 of 5 probe fits" in caplog.text


def test_settings_validation_and_feature_checks():
    with pytest.raises(ValueError, match="exactly one of C and weight_decay"):
        ProbeSettings(weight_decay=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        ProbeSettings(C=None)
    with pytest.raises(ValueError, match="train_size"):
        ProbeSettings(train_size=1.0)
    assert ProbeSettings(seeds=[1, 2]).seeds == (1, 2)
    with pytest.raises(ValueError, match="expected"):
        run_probe(np.zeros((10, 3)), ["a", "b"] * 6, ProbeSettings())
    with pytest.raises(ValueError, match="NaN"):
        run_probe(np.full((4, 2), np.nan), ["a", "b"] * 2, ProbeSettings())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result():
    X, codes = clustered_data(300, 32, 5, separation=0.4, seed=1)
    labels = [str(code) for code in codes]
    on_cpu = run_probe(X, labels, ProbeSettings(tol=1e-8))
    on_gpu = run_probe(X, labels, ProbeSettings(tol=1e-8, device="cuda"))
    for row_cpu, row_gpu in zip(on_cpu.per_seed, on_gpu.per_seed):
        assert row_cpu["accuracy"] == row_gpu["accuracy"]


def test_retention_is_the_share_of_above_chance_accuracy_kept():
    from mcollapse.analysis.probes import retention

    assert retention(0.5, 0.75, 0.25) == pytest.approx(0.5)
    assert retention(0.9, 0.6, 0.2) == pytest.approx(1.75)  # the LLM amplifies
    assert retention(0.4, 0.25, 0.25) is None  # an adapter at chance has nothing to keep
