"""Linear probes: how much of a label can a linear read-out recover from pooled hidden states?

The classifier is L2-regularised logistic regression with exactly the objective of
scikit-learn's ``LogisticRegression(C=C)`` (lbfgs solver, scikit-learn >= 1.8)::

    mean_i  -log softmax(W x_i + b)[y_i]  +  ||W||^2 / (2 * C * n_train)

on z-scored features, with the intercept ``b`` unpenalised. With more than two classes every class
has its own weight vector (the symmetric multinomial model). With two classes scikit-learn fits the
binomial model, one weight vector against a class-0 logit fixed at zero; we do the same, so
coefficients, probabilities and predictions agree with scikit-learn, not just accuracies.

It is solved in torch, on the configured device, by the batched L-BFGS of `analysis.logistic`, all
(hook, seed) problems as one batch. The seed splits of one hook share a
single copy of its feature matrix: a split is a sample weighting and its train-split z-scoring is
folded into the weights, so all seeds of a hook cost one matrix product with seeds x classes
columns per step instead of one product per seed over copied rows. The solve runs in float32 as
far as float32 carries and is finished and verified in float64, so `converged` always refers to
the exact objective.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedShuffleSplit

from mcollapse.analysis.logistic import DTYPE, StackedLogisticObjective, minimise

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")

_BLOCK_BYTES = 1 << 30       # cap on the feature matrices batched together on an accelerator


@dataclass
class ProbeSettings:
    """How probes are fitted; defaults are the paper's protocol (C = 1, seeds 42-46, 80/20).

    tol bounds the max-abs gradient of the mean objective, the quantity scikit-learn's lbfgs `tol`
    bounds too (its default 1e-4 can leave C = 1 probes visibly short of the optimum). The
    reference preset is C=None, weight_decay=1e-4, max_iter=100. device is any torch device.
    """

    C: float | None = 1.0
    weight_decay: float | None = None
    max_iter: int = 1000
    tol: float = 1e-6
    train_size: float = 0.8
    seeds: tuple[int, ...] = (42, 43, 44, 45, 46)
    min_samples: int = 20
    device: str = "cpu"

    def __post_init__(self) -> None:
        # Configs hand over lists; one tuple of ints keeps settings hashable and comparable.
        self.seeds = tuple(int(seed) for seed in self.seeds)
        if (self.C is None) == (self.weight_decay is None):
            raise ValueError(
                "ProbeSettings needs exactly one of C and weight_decay "
                "(set C=None to use the reference rule C = 1 / (weight_decay * n_train))"
            )
        if self.C is not None and not (math.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be a positive finite number, got {self.C}")
        if self.weight_decay is not None and not (
            math.isfinite(self.weight_decay) and self.weight_decay > 0
        ):
            raise ValueError(f"weight_decay must be positive, got {self.weight_decay}")
        if not 0.0 < self.train_size < 1.0:
            raise ValueError(f"train_size must lie in (0, 1), got {self.train_size}")
        if self.max_iter < 1 or self.tol <= 0:
            raise ValueError("max_iter must be >= 1 and tol > 0")
        if not self.seeds:
            raise ValueError("at least one seed is needed")

    def regularization_C(self, n_train: int) -> float:
        """The C used: the given one, or the reference rule 1 / (weight_decay * n_train)."""
        if self.C is not None:
            return float(self.C)
        return 1.0 / (float(self.weight_decay) * n_train)


@dataclass
class ProbeOutcome:
    """Per-seed test metrics of one probe plus the baselines needed to read them.

    Each per_seed row holds seed, accuracy, macro_f1, balanced_accuracy, n_train, n_test, C,
    converged (max-abs gradient <= tol in float64), n_iter (L-BFGS steps, both precisions) and
    grad_max (the final max-abs gradient).
    """

    per_seed: list[dict]
    n_classes: int
    chance: float
    majority: float
    dropped_classes: dict[str, int]
    n_used: int
    skipped_reason: str | None = None
    label_entropy: float = math.nan  # H(Y) in nats, of the labels the probe used

    @property
    def information(self) -> float:
        """H(Y) - held-out cross-entropy (nats, mean over seeds): a lower bound on I(Z; Y)."""
        return self.label_entropy - self.mean("log_loss")

    def values(self, metric: str) -> np.ndarray:
        return np.array([row[metric] for row in self.per_seed], dtype=float)

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return float(values.mean()) if values.size else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation (ddof=1) across seeds; NaN with fewer than two seeds."""
        values = self.values(metric)
        return float(values.std(ddof=1)) if values.size > 1 else math.nan

    @property
    def n_not_converged(self) -> int:
        return sum(not row["converged"] for row in self.per_seed)


def run_probe(X: np.ndarray, labels: Sequence[str | None], settings: ProbeSettings) -> ProbeOutcome:
    """Probe one feature matrix (n, d) for one label sequence of length n."""
    return run_probes({"features": X}, labels, settings)["features"]


def run_probes(
    features: Mapping[str, np.ndarray],
    labels: Sequence[str | None],
    settings: ProbeSettings,
) -> dict[str, ProbeOutcome]:
    """Probe several hooks for the same labels.

    The hooks share label filtering and the seed splits, so their accuracies differ only by what
    the representations hold; all (hook, seed) fits of a batch of hooks are solved together.
    """
    plan = _plan_labels(labels, settings.min_samples)
    matrices = _checked_features(features, len(plan.raw_labels))
    if plan.skipped_reason is not None:
        logger.info("probe skipped: %s", plan.skipped_reason)
        return {hook: plan.outcome([]) for hook in matrices}

    splits = [_stratified_split(plan.codes, settings.train_size, seed) for seed in settings.seeds]
    if splits[0].enlarged:
        logger.warning(
            "probe split changed to %d train / %d test samples so that each of the %d classes "
            "fits (n=%d, train_size=%g)",
            len(splits[0].train), len(splits[0].test), len(plan.class_names), plan.n_used,
            settings.train_size,
        )
    n_train = len(splits[0].train)
    C = settings.regularization_C(n_train)
    device = torch.device(settings.device)
    seed_design = _SeedDesign.build(plan.codes, len(plan.class_names), splits, device)

    rows: dict[str, list[dict]] = {}
    for hooks in _hook_batches(matrices, plan.n_used, device):
        objective = seed_design.objective(
            [matrices[hook][plan.kept_rows] for hook in hooks], 1.0 / (C * n_train)
        )
        theta, converged, n_iter, grad_max = minimise(objective, settings.max_iter, settings.tol)
        logits = objective.logits(theta)  # (G, n, S, K)
        predictions = logits.argmax(dim=-1).cpu().numpy()
        log_probs = torch.log_softmax(logits, dim=-1).clamp(min=_LOG_PROB_FLOOR).cpu().numpy()
        del logits
        converged, n_iter, grad_max = converged.cpu(), n_iter.cpu(), grad_max.cpu()
        for g, hook in enumerate(hooks):
            rows[hook] = []
            for s, split in enumerate(splits):
                problem = g * len(splits) + s
                rows[hook].append({
                    "seed": settings.seeds[s],
                    **_test_metrics(plan.codes[split.test], predictions[g, split.test, s]),
                    "log_loss": _log_loss(plan.codes[split.test], log_probs[g, split.test, s]),
                    "n_train": n_train,
                    "n_test": len(split.test),
                    "C": C,
                    "converged": bool(converged[problem]),
                    "n_iter": int(n_iter[problem]),
                    "grad_max": float(grad_max[problem]),
                })
        del objective

    outcomes = {hook: plan.outcome(rows[hook]) for hook in matrices}
    n_fits = sum(len(outcome.per_seed) for outcome in outcomes.values())
    n_failed = sum(outcome.n_not_converged for outcome in outcomes.values())
    if n_failed:
        logger.warning(
            "%d of %d probe fits stopped before reaching gradient tolerance %g "
            "(max_iter=%d); see per_seed['converged'] and ['grad_max']",
            n_failed, n_fits, settings.tol, settings.max_iter,
        )
    return outcomes


# ---------------------------------------------------------------------------------------------
# labels, splits, features


@dataclass
class _LabelPlan:
    """Which rows and classes a probe uses, shared by every hook probed for these labels."""

    raw_labels: list
    kept_rows: np.ndarray
    codes: np.ndarray
    class_names: list[str]
    dropped_classes: dict[str, int]
    majority: float
    skipped_reason: str | None

    @property
    def label_entropy(self) -> float:
        if not len(self.codes):
            return math.nan
        p = np.bincount(self.codes) / len(self.codes)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def n_used(self) -> int:
        return len(self.kept_rows)

    def outcome(self, per_seed: list[dict]) -> ProbeOutcome:
        n_classes = len(self.class_names)
        return ProbeOutcome(
            per_seed=per_seed,
            n_classes=n_classes,
            chance=1.0 / n_classes if n_classes else math.nan,
            majority=self.majority,
            label_entropy=self.label_entropy,
            dropped_classes=dict(self.dropped_classes),
            n_used=self.n_used,
            skipped_reason=self.skipped_reason,
        )


def _plan_labels(labels: Sequence[str | None], min_samples: int) -> _LabelPlan:
    """Drop missing labels and singleton classes (a stratified split needs two of each)."""
    raw = list(labels)
    labelled = [(row, str(label)) for row, label in enumerate(raw) if label is not None]
    counts = Counter(name for _, name in labelled)
    dropped = {name: count for name, count in sorted(counts.items()) if count < 2}
    kept = [(row, name) for row, name in labelled if name not in dropped]
    class_names = sorted({name for _, name in kept})
    index = {name: code for code, name in enumerate(class_names)}
    codes = np.array([index[name] for _, name in kept], dtype=np.int64)
    kept_rows = np.array([row for row, _ in kept], dtype=np.int64)
    majority = float(np.bincount(codes).max() / len(codes)) if len(codes) else math.nan

    reason = None
    if len(kept) < min_samples:
        reason = (
            f"{len(kept)} labelled samples in classes with >= 2 members, "
            f"fewer than min_samples={min_samples}"
        )
    elif len(class_names) < 2:
        reason = f"{len(class_names)} class(es) with >= 2 members; a probe needs 2"
    return _LabelPlan(raw, kept_rows, codes, class_names, dropped, majority, reason)


@dataclass
class _Split:
    train: np.ndarray
    test: np.ndarray
    enlarged: bool


def _stratified_split(codes: np.ndarray, train_size: float, seed: int) -> _Split:
    """One StratifiedShuffleSplit per seed.

    scikit-learn refuses a split whose train or test part has fewer rows than there are classes
    (e.g. 30 samples in 10 classes give 6 test rows). Then the short part is raised to exactly K
    rows, the smallest split it accepts; every class has >= 2 members, so n >= 2K and both fit.
    """
    n_samples, n_classes = len(codes), int(codes.max()) + 1
    n_train = math.floor(train_size * n_samples)
    enlarged = not (n_classes <= n_train <= n_samples - n_classes)
    if enlarged:
        n_train = min(max(n_train, n_classes), n_samples - n_classes)
        splitter = StratifiedShuffleSplit(
            n_splits=1, train_size=n_train, test_size=n_samples - n_train, random_state=seed
        )
    else:
        splitter = StratifiedShuffleSplit(n_splits=1, train_size=train_size, random_state=seed)
    train, test = next(splitter.split(np.zeros((n_samples, 1)), codes))
    return _Split(np.sort(train), np.sort(test), enlarged)


def _checked_features(features: Mapping[str, np.ndarray], n_rows: int) -> dict[str, np.ndarray]:
    matrices = {}
    for hook, array in features.items():
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[0] != n_rows:
            raise ValueError(
                f"features[{hook!r}] has shape {array.shape}; "
                f"expected ({n_rows}, d) to match the labels"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"features[{hook!r}] contains NaN or infinite values")
        matrices[hook] = array
    return matrices


def _hook_batches(
    matrices: Mapping[str, np.ndarray], n_rows: int, device: torch.device
) -> list[list[str]]:
    """Hooks of equal width fitted together.

    On an accelerator, batching hooks fills the device. On a CPU it does not save arithmetic but
    pushes the working set out of cache, so hooks go one at a time there (their seeds still share).
    """
    by_width: dict[int, list[str]] = {}
    for hook, array in matrices.items():
        by_width.setdefault(array.shape[1], []).append(hook)
    batches = []
    for width, hooks in by_width.items():
        per_hook = n_rows * width * (torch.finfo(DTYPE).bits // 8)
        capacity = 1 if device.type == "cpu" else max(1, _BLOCK_BYTES // max(1, per_hook))
        batches.extend(hooks[i : i + capacity] for i in range(0, len(hooks), capacity))
    return batches


_LOG_PROB_FLOOR = math.log(1e-15)  # as scikit-learn's log_loss clips probabilities


def _log_loss(truth: np.ndarray, log_probs: np.ndarray) -> float:
    """Held-out cross-entropy in nats; H(Y) minus it lower-bounds I(Z; Y) (the probe's information)."""
    return float(-log_probs[np.arange(len(truth)), truth].mean())


def _test_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Balanced accuracy averages recall over the classes present in the test split; predicting
    a class absent from it is expected with small splits, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(truth, predicted))
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "balanced_accuracy": balanced,
    }


@dataclass
class _SeedDesign:
    """The seed splits as device tensors: train weights, train rows and classes seen per seed."""

    codes: torch.Tensor          # (n,)
    sample_weight: torch.Tensor  # (S, n): 1 / n_train on a seed's train rows, else 0
    train_rows: list[torch.Tensor]
    class_present: torch.Tensor  # (S, K)

    @classmethod
    def build(
        cls, codes: np.ndarray, n_classes: int, splits: list[_Split], device: torch.device
    ) -> _SeedDesign:
        weight = np.zeros((len(splits), len(codes)))
        present = np.zeros((len(splits), n_classes), dtype=bool)
        for s, split in enumerate(splits):
            weight[s, split.train] = 1.0 / len(split.train)
            present[s, np.unique(codes[split.train])] = True
        return cls(
            codes=torch.as_tensor(codes, device=device),
            sample_weight=torch.as_tensor(weight, dtype=DTYPE, device=device),
            train_rows=[torch.as_tensor(split.train, device=device) for split in splits],
            class_present=torch.as_tensor(present, device=device),
        )

    def objective(
        self, raw_features: list[np.ndarray], l2_strength: float
    ) -> StackedLogisticObjective:
        """The stacked objective of these hooks, each z-scored on every seed's train rows.

        Features are first centred and scaled over all rows (for well-conditioned products), and
        each seed's train-split mean and std, as StandardScaler would compute them on the raw
        values, are kept as a per-seed shift and scale applied inside the objective.
        """
        device = self.codes.device
        X = torch.stack(
            [torch.as_tensor(array, dtype=DTYPE, device=device) for array in raw_features]
        )
        centre = X.mean(dim=1, keepdim=True)
        X -= centre
        spread = X.square().mean(dim=1, keepdim=True).sqrt()
        spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        X /= spread

        eps = torch.finfo(DTYPE).eps
        shifts, scales = [], []
        for rows in self.train_rows:
            train = X[:, rows]
            mean, var = train.mean(dim=1), train.var(dim=1, unbiased=False)
            # StandardScaler's near-constant rule, judged on raw-unit mean and variance.
            n = len(rows)
            raw_mean, raw_var = centre[:, 0] + mean * spread[:, 0], var * spread[:, 0].square()
            constant = raw_var <= n * eps * raw_var + (n * raw_mean * eps) ** 2
            shifts.append(mean)
            scales.append(torch.where(constant, 1.0 / spread[:, 0], var.sqrt()))
            del train
        n_hooks, n_seeds = X.shape[0], self.sample_weight.shape[0]
        return StackedLogisticObjective(
            X=X,
            y=self.codes.expand(n_hooks, -1),
            sample_weight=self.sample_weight,
            shift=torch.stack(shifts, dim=1),
            scale=torch.stack(scales, dim=1),
            l2_strength=torch.full((n_hooks, n_seeds), l2_strength, dtype=DTYPE, device=device),
            class_present=self.class_present.expand(n_hooks, -1, -1),
        )


def retention(acc_final: float, acc_adapter: float, chance: float) -> float | None:
    """Share of the adapter's above-chance accuracy still there at the final norm (None when the
    adapter itself is at chance, where the ratio means nothing)."""
    above = acc_adapter - chance
    return (acc_final - chance) / above if above > 1e-9 else None
