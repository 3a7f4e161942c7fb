"""Probe transfer: train a linear probe in one setting (a model x an input modality), test it in
another on held-out items, and compare the probe directions of the two settings.

Rows of every setting are the same items in the same order, so one item split serves all settings
and a probe is never tested on an item it was trained on, in any setting. Features are z-scored
before the probe sees them: by the training setting's own training rows (`standardize=source`),
or each setting by its own training rows (`own`, the default; it removes a setting-wide offset,
which a probe trained elsewhere cannot know, and uses no test row and no label of the target).
The classifier is `analysis.logistic` (scikit-learn's L2 logistic objective, C per training size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from mcollapse.analysis.logistic import fit_logistic_regression

STANDARDIZE = ("own", "source")


@dataclass
class LinearProbe:
    """A probe fitted on z-scored features: logits = ((x - shift) / scale) @ weights + intercepts."""

    weights: np.ndarray  # (d, K)
    intercepts: np.ndarray  # (K,)
    shift: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    present: np.ndarray  # (K,) classes seen in training
    converged: bool

    def logits(self, X: np.ndarray, shift: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
        shift = self.shift if shift is None else shift
        scale = self.scale if scale is None else scale
        out = ((X - shift) / scale) @ self.weights + self.intercepts
        out[:, ~self.present] = -np.inf
        return out

    def direction(self) -> np.ndarray:
        """The probe's weights with the class mean removed (softmax ignores it), flattened: for two
        classes the cosine of two such directions is the cosine of the two weight vectors."""
        w = self.weights[:, self.present]
        return (w - w.mean(axis=1, keepdims=True)).ravel()


def standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shift = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return shift, scale


def fit_probes(train: Sequence[np.ndarray], codes: np.ndarray, n_classes: int, C: float,
               max_iter: int = 1000, tol: float = 1e-6) -> list[LinearProbe]:
    """One probe per feature matrix (n, d), all for the same labels `codes`, solved as one batch
    where the widths agree."""
    out: list[LinearProbe | None] = [None] * len(train)
    by_width: dict[int, list[int]] = {}
    for i, X in enumerate(train):
        by_width.setdefault(X.shape[1], []).append(i)
    for members in by_width.values():
        scalers = [standardizer(train[i]) for i in members]
        Z = np.stack([(train[i] - s) / c for i, (s, c) in zip(members, scalers)])
        y = np.tile(codes, (len(members), 1))
        fit = fit_logistic_regression(torch.from_numpy(Z), torch.from_numpy(y), n_classes, C,
                                      max_iter=max_iter, tol=tol)
        for g, i in enumerate(members):
            out[i] = LinearProbe(fit.weights[g].numpy(), fit.intercepts[g].numpy(), *scalers[g],
                                 fit.class_present[g].numpy().astype(bool), bool(fit.converged[g]))
    return out  # type: ignore[return-value]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0 or a.shape != b.shape:
        return float("nan")
    return float(a @ b / (na * nb))


def group_split(groups: Sequence[str], train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and test: whole groups (items) go to one side."""
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError("a split needs at least two items")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(distinct))
    n_train = min(len(distinct) - 1, max(1, round(train_size * len(distinct))))
    train_groups = {distinct[i] for i in order[:n_train]}
    member = np.array([g in train_groups for g in groups])
    return np.flatnonzero(member), np.flatnonzero(~member)


@dataclass
class TransferResult:
    settings: list[str]
    classes: list[str]
    chance: float  # the majority class share of the test rows, averaged over seeds
    accuracy: np.ndarray  # (seeds, train setting, test setting)
    direction_cosine: np.ndarray  # (seeds, setting, setting); nan where the widths differ
    converged: bool
    n_train: int
    n_test: int
    per_seed_chance: list[float] = field(default_factory=list)


def transfer_matrix(features: Mapping[str, np.ndarray], labels: Sequence[str | None], groups: Sequence[str],
                    seeds: Sequence[int], C: float = 1.0, train_size: float = 0.8, standardize: str = "own",
                    max_iter: int = 1000, tol: float = 1e-6) -> TransferResult:
    """Accuracy of a probe trained on setting a's training items, tested on setting b's test items,
    for every ordered pair (a, b) (the diagonal is the usual in-setting probe), per seed; and the
    cosine between the probe directions of every two settings (same width only).

    Rows without a label are dropped. `C` is scikit-learn's C (the penalty divides by C * n_train)."""
    if standardize not in STANDARDIZE:
        raise ValueError(f"standardize '{standardize}' is not one of {STANDARDIZE}")
    names = list(features)
    keep = np.array([lab is not None for lab in labels])
    classes = sorted({lab for lab in labels if lab is not None})
    codes_all = np.array([classes.index(lab) if lab is not None else -1 for lab in labels])
    X = {name: np.asarray(features[name], dtype=np.float64)[keep] for name in names}
    codes = codes_all[keep]
    kept_groups = [g for g, k in zip(groups, keep) if k]
    S = len(names)
    acc = np.full((len(seeds), S, S), np.nan)
    cos = np.full((len(seeds), S, S), np.nan)
    converged, chances = True, []
    n_train = n_test = 0
    for s, seed in enumerate(seeds):
        train, test = group_split(kept_groups, train_size, seed)
        n_train, n_test = len(train), len(test)
        probes = fit_probes([X[n][train] for n in names], codes[train], len(classes), C, max_iter, tol)
        converged &= all(p.converged for p in probes)
        counts = np.bincount(codes[test], minlength=len(classes))
        chances.append(float(counts.max() / counts.sum()))
        for a, probe in enumerate(probes):
            for b, target in enumerate(names):
                if X[target].shape[1] != X[names[a]].shape[1]:
                    continue
                shift = scale = None
                if standardize == "own":
                    shift, scale = standardizer(X[target][train])
                predicted = probe.logits(X[target][test], shift, scale).argmax(axis=1)
                acc[s, a, b] = float(np.mean(predicted == codes[test]))
                cos[s, a, b] = cosine(probe.direction(), probes[b].direction())
    return TransferResult(names, classes, float(np.mean(chances)), acc, cos, converged, n_train, n_test, chances)


def modality_features(modal: np.ndarray, text: np.ndarray,
                      ids: Sequence[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Stack modal and text rows of the same items: features, labels (modal | text) and the item
    of each row, so a split by item keeps both rows of an item on one side."""
    if modal.shape != text.shape or len(ids) != len(modal):
        raise ValueError("modal and text rows must be the same items")
    features = np.concatenate([modal, text])
    labels = ["modal"] * len(modal) + ["text"] * len(text)
    return features, labels, list(ids) + list(ids)


def shuffled_within_items(labels: Sequence[str], groups: Sequence[str], seed: int) -> list[str]:
    """The labels permuted within each item: a control where the label carries nothing the
    features could hold, so a probe must land at chance."""
    rng = np.random.default_rng(seed)
    out = list(labels)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        permuted = rng.permutation(rows)
        for src, dst in zip(rows, permuted):
            out[dst] = labels[src]
    return out
