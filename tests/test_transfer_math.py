"""Planted truths of probe transfer: a shared direction transfers, an orthogonal one gives chance;
a difference in padding alone is not separable once pads are masked."""

from __future__ import annotations

import numpy as np
import torch

from mcollapse.analysis.transfer import modality_features, shuffled_within_items, transfer_matrix
from mcollapse.extraction.pooling import masked_mean


def _planted(direction, labels, rng, offset=0.0, noise=0.3):
    y = np.array([1.0 if lab == "b" else -1.0 for lab in labels])
    return y[:, None] * direction[None, :] + noise * rng.standard_normal((len(y), direction.size)) + offset


def test_shared_direction_transfers_and_orthogonal_gives_chance():
    rng = np.random.default_rng(0)
    d, n = 32, 120
    u = np.zeros(d)
    u[0] = 1.0
    v = np.zeros(d)
    v[1] = 1.0
    labels = list(rng.choice(["a", "b"], size=n))
    groups = [f"item{i}" for i in range(n)]
    features = {"text": _planted(u, labels, rng), "modal": _planted(u, labels, rng, offset=5.0),
                "other": _planted(v, labels, rng)}
    result = transfer_matrix(features, labels, groups, seeds=[1, 2, 3], C=1.0)
    acc = result.accuracy.mean(axis=0)
    cos = np.nanmean(result.direction_cosine, axis=0)
    t, m, o = (result.settings.index(k) for k in ("text", "modal", "other"))
    assert acc[t, t] > 0.95 and acc[t, m] > 0.95 and acc[m, t] > 0.95  # shared: transfers, offset removed
    assert abs(acc[t, o] - 0.5) < 0.15 and abs(acc[o, t] - 0.5) < 0.15  # orthogonal: chance
    assert cos[t, m] > 0.8 and abs(cos[t, o]) < 0.3
    np.testing.assert_allclose(np.diagonal(cos), 1.0)


def test_standardize_source_keeps_the_offset():
    rng = np.random.default_rng(1)
    u = np.eye(8)[0]
    labels = list(rng.choice(["a", "b"], size=80))
    groups = [str(i) for i in range(80)]
    features = {"x": _planted(u, labels, rng), "y": _planted(u, labels, rng, offset=u * 10.0)}
    result = transfer_matrix(features, labels, groups, seeds=[0], standardize="source")
    assert result.accuracy[0, 0, 1] < 0.8  # an offset along the direction pushes every row to one class


def test_split_is_by_item():
    rng = np.random.default_rng(2)
    labels = ["a", "b"] * 20
    groups = [f"g{i // 2}" for i in range(40)]
    X = rng.standard_normal((40, 4))
    result = transfer_matrix({"x": X}, labels, groups, seeds=[0])
    assert result.n_train + result.n_test == 40 and result.n_train % 2 == 0


def test_pad_only_difference_is_not_separable_once_masked():
    rng = np.random.default_rng(3)
    n, width, d = 60, 12, 16
    pad = torch.full((d,), 3.0)
    hidden, mask = [], []
    for i in range(2 * n):
        length = 4 if i < n else 10  # "modal" rows are padded more; the content is the same distribution
        rows = torch.tensor(rng.standard_normal((width, d)), dtype=torch.float32)
        rows[length:] = pad
        hidden.append(rows)
        mask.append(torch.arange(width) < length)
    hidden, mask = torch.stack(hidden), torch.stack(mask)
    masked = masked_mean(hidden, mask).numpy()
    unmasked = masked_mean(hidden, torch.ones_like(mask)).numpy()
    ids = [f"item{i}" for i in range(n)]
    for pooled, separable in ((unmasked, True), (masked, False)):
        features, labels, groups = modality_features(pooled[:n], pooled[n:], ids)
        acc = transfer_matrix({"f": features}, labels, groups, seeds=[0, 1, 2]).accuracy.mean()
        assert (acc > 0.95) if separable else (abs(acc - 0.5) < 0.2), (separable, acc)


def test_shuffled_within_items_gives_chance():
    rng = np.random.default_rng(4)
    n = 80
    modal, text = rng.standard_normal((n, 8)) + 2.0, rng.standard_normal((n, 8))
    features, labels, groups = modality_features(modal, text, [str(i) for i in range(n)])
    assert transfer_matrix({"f": features}, labels, groups, seeds=[0]).accuracy.mean() > 0.9
    control = shuffled_within_items(labels, groups, seed=0)
    assert sorted(control) == sorted(labels)
    assert abs(transfer_matrix({"f": features}, control, groups, seeds=[0, 1, 2]).accuracy.mean() - 0.5) < 0.15
