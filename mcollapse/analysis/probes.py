"""Linear probes: how much of a label can a linear read-out recover from pooled hidden states?

The classifier is L2-regularised logistic regression with exactly the objective of
scikit-learn's ``LogisticRegression(C=C)`` (lbfgs solver, scikit-learn >= 1.8)::

    mean_i  -log softmax(W x_i + b)[y_i]  +  ||W||^2 / (2 * C * n_train)

on z-scored features, with the intercept ``b`` unpenalised. With more than two classes every class
has its own weight vector (the symmetric multinomial model). With two classes scikit-learn fits the
binomial model, one weight vector against a class-0 logit fixed at zero; we do the same, so
coefficients, probabilities and predictions agree with scikit-learn, not just accuracies.

It is solved in torch, on the configured device, by an L-BFGS that runs many independent problems
as one batch. Each problem keeps its own curvature history, step length and stopping state, so
batching changes the speed and never the result of a fit. The seed splits of one hook share a
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

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "macro_f1", "balanced_accuracy")

_HISTORY_SIZE = 10           # curvature pairs kept per problem (scipy's L-BFGS-B default)
_MAX_LINE_SEARCH_STEPS = 40  # backtracking steps before a float64 problem is declared stuck
_ROUGH_LINE_SEARCH_STEPS = 10  # in float32, hand a stuck problem to float64 sooner
_ROUGH_PATIENCE = 20         # float32 steps without 10 % gradient progress before handing over
_ARMIJO_C1 = 1e-4            # sufficient-decrease constant of the line search
_BLOCK_BYTES = 1 << 30       # cap on the feature matrices batched together on an accelerator
_DTYPE = torch.float64


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


@dataclass
class LogisticFit:
    """A batch of fitted logistic regressions; index 0 of every tensor is the problem."""

    weights: torch.Tensor        # (B, d, K); the pinned class-0 column of binary problems is 0
    intercepts: torch.Tensor     # (B, K)
    class_present: torch.Tensor  # (B, K) classes seen in training; others are never predicted
    converged: torch.Tensor      # (B,) max-abs gradient reached tol
    n_iter: torch.Tensor         # (B,) accepted L-BFGS steps
    grad_max: torch.Tensor       # (B,) final max-abs gradient of the objective

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits (B, n, K); absent classes get -inf so argmax and softmax ignore them."""
        offset = _absent_class_offset(self.class_present, self.weights.dtype)
        X = X.to(self.weights.dtype)
        return torch.baddbmm((self.intercepts + offset)[:, None, :], X, self.weights)

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(X), dim=-1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.decision_function(X).argmax(dim=-1)


def fit_logistic_regression(
    X: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LogisticFit:
    """Fit B independent problems X[b] (n, d) -> y[b] (n,) with scikit-learn's objective.

    X is used as given (standardize it first). Classes missing from a problem's labels get no
    weights and are never predicted, as when scikit-learn only sees the classes present; when
    exactly two are present the lower one is pinned at logit 0, as in its binomial model.
    """
    if X.ndim != 3 or y.shape != X.shape[:2]:
        raise ValueError(
            f"expected X (B, n, d) and y (B, n), got {tuple(X.shape)} and {tuple(y.shape)}"
        )
    n_problems, n_samples, n_features = X.shape
    X = X.to(_DTYPE)
    y = y.to(device=X.device, dtype=torch.long)
    device = X.device
    present = torch.nn.functional.one_hot(y, n_classes).sum(dim=1)[:, None, :] > 0
    objective = _StackedLogisticObjective(
        X=X,
        y=y,
        sample_weight=torch.full((1, n_samples), 1.0 / n_samples, dtype=_DTYPE, device=device),
        shift=torch.zeros(n_problems, 1, n_features, dtype=_DTYPE, device=device),
        scale=torch.ones(n_problems, 1, n_features, dtype=_DTYPE, device=device),
        l2_strength=torch.full((n_problems, 1), 1.0 / (C * n_samples), dtype=_DTYPE, device=device),
        class_present=present,
    )
    theta, converged, n_iter, grad_max = _minimise(objective, max_iter, tol)
    params = theta.view(n_problems, n_features + 1, n_classes)
    intercepts = _centred_intercepts(params[:, n_features], objective.free_columns[:, 0])
    return LogisticFit(
        params[:, :n_features].contiguous(), intercepts, present[:, 0], converged, n_iter, grad_max
    )


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
        theta, converged, n_iter, grad_max = _minimise(objective, settings.max_iter, settings.tol)
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
        per_hook = n_rows * width * (torch.finfo(_DTYPE).bits // 8)
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
            sample_weight=torch.as_tensor(weight, dtype=_DTYPE, device=device),
            train_rows=[torch.as_tensor(split.train, device=device) for split in splits],
            class_present=torch.as_tensor(present, device=device),
        )

    def objective(
        self, raw_features: list[np.ndarray], l2_strength: float
    ) -> _StackedLogisticObjective:
        """The stacked objective of these hooks, each z-scored on every seed's train rows.

        Features are first centred and scaled over all rows (for well-conditioned products), and
        each seed's train-split mean and std, as StandardScaler would compute them on the raw
        values, are kept as a per-seed shift and scale applied inside the objective.
        """
        device = self.codes.device
        X = torch.stack(
            [torch.as_tensor(array, dtype=_DTYPE, device=device) for array in raw_features]
        )
        centre = X.mean(dim=1, keepdim=True)
        X -= centre
        spread = X.square().mean(dim=1, keepdim=True).sqrt()
        spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        X /= spread

        eps = torch.finfo(_DTYPE).eps
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
        return _StackedLogisticObjective(
            X=X,
            y=self.codes.expand(n_hooks, -1),
            sample_weight=self.sample_weight,
            shift=torch.stack(shifts, dim=1),
            scale=torch.stack(scales, dim=1),
            l2_strength=torch.full((n_hooks, n_seeds), l2_strength, dtype=_DTYPE, device=device),
            class_present=self.class_present.expand(n_hooks, -1, -1),
        )


# ---------------------------------------------------------------------------------------------
# the batched objective and solver


def _absent_class_offset(class_present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=class_present.device)
    return torch.where(class_present, zero, torch.full_like(zero, -math.inf))


def _free_columns(class_present: torch.Tensor) -> torch.Tensor:
    """Class columns with trainable parameters: present classes, minus the binomial's pinned one."""
    free = class_present.clone()
    binary = class_present.sum(dim=-1) == 2
    lower_present = class_present.to(torch.int8).argmax(dim=-1)
    pinned = torch.nn.functional.one_hot(lower_present, class_present.shape[-1]).bool()
    return free & ~(pinned & binary[..., None])


def _centred_intercepts(intercepts: torch.Tensor, free_columns: torch.Tensor) -> torch.Tensor:
    """Shift multinomial intercepts to mean zero over the free classes, as scikit-learn's are.

    The multinomial intercept is defined only up to a shared shift (scikit-learn's solver starts
    at zero and never adds one); binomial intercepts are identified and returned unchanged.
    """
    free = free_columns.to(intercepts.dtype)
    multinomial = (free_columns.sum(dim=-1) > 1)[..., None]
    centre = (intercepts * free).sum(dim=-1, keepdim=True) / free.sum(dim=-1, keepdim=True)
    return torch.where(multinomial, (intercepts - centre) * free, intercepts)


class _StackedLogisticObjective:
    """Logistic objectives of G feature matrices x S sample weightings; problem p = g * S + s.

    Problem (g, s) is  sum_i w_si * CE(y_gi, softmax(((X_gi - shift_gs) / scale_gs) W + b))
    + l2_gs / 2 * ||W||^2. Its parameters are flattened from a (d + 1, K) view: rows 0..d-1 are
    weights, row d the intercepts. Gradients of pinned or absent class columns are zeroed, so
    L-BFGS never moves them off zero.
    """

    def __init__(self, X, y, sample_weight, shift, scale, l2_strength, class_present):
        self.X, self.y = X, y                      # (G, n, d), (G, n)
        self.sample_weight = sample_weight         # (S, n)
        self.shift, self.scale = shift, scale      # (G, S, d)
        self.l2_strength = l2_strength             # (G, S)
        self.class_present = class_present         # (G, S, K)
        self.free_columns = _free_columns(class_present)
        self.logit_offset = _absent_class_offset(class_present, X.dtype)
        self.onehot = torch.nn.functional.one_hot(y, class_present.shape[-1]).to(X.dtype)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        n_groups, n_samples, n_features = self.X.shape
        return n_groups, self.sample_weight.shape[0], n_samples, n_features, self.onehot.shape[-1]

    @property
    def n_problems(self) -> int:
        return self.X.shape[0] * self.sample_weight.shape[0]

    def to(self, dtype: torch.dtype) -> _StackedLogisticObjective:
        return _StackedLogisticObjective(
            X=self.X.to(dtype), y=self.y, sample_weight=self.sample_weight.to(dtype),
            shift=self.shift.to(dtype), scale=self.scale.to(dtype),
            l2_strength=self.l2_strength.to(dtype), class_present=self.class_present,
        )

    def initial_parameters(self) -> torch.Tensor:
        n_groups, n_seeds, _, n_features, n_classes = self.shape
        n_params = (n_features + 1) * n_classes
        return self.X.new_zeros(n_groups * n_seeds, n_params)

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_groups, n_seeds, _, n_features, n_classes = self.shape
        params = theta.view(n_groups, n_seeds, n_features + 1, n_classes)
        return params[:, :, :n_features], params[:, :, n_features]

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """Logits (G, n, S, K) of every row under every problem's parameters."""
        weights, intercepts = self._split(theta)
        return self._logits(weights, intercepts)

    def _logits(self, weights: torch.Tensor, intercepts: torch.Tensor) -> torch.Tensor:
        n_groups, n_seeds, n_samples, n_features, n_classes = self.shape
        raw_weights = weights / self.scale[..., None]
        raw_intercepts = (
            intercepts - torch.einsum("gsd,gsdk->gsk", self.shift, raw_weights) + self.logit_offset
        )
        stacked = raw_weights.permute(0, 2, 1, 3).reshape(n_groups, n_features, n_seeds * n_classes)
        logits = torch.bmm(self.X, stacked).view(n_groups, n_samples, n_seeds, n_classes)
        return logits + raw_intercepts[:, None]

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_groups, n_seeds, n_samples, n_features, n_classes = self.shape
        weights, intercepts = self._split(theta)
        log_probs = torch.log_softmax(self._logits(weights, intercepts), dim=-1)
        row_weight = self.sample_weight.T  # (n, S)

        picked = log_probs.gather(3, self.y[:, :, None, None].expand(-1, -1, n_seeds, 1))[..., 0]
        # Rows outside a split may belong to a class it never saw (log-prob -inf, weight 0).
        picked = torch.where(row_weight > 0, picked, torch.zeros_like(picked))
        nll = -(picked * row_weight).sum(dim=1)

        residual = (log_probs.exp() - self.onehot[:, :, None, :]) * row_weight[None, :, :, None]
        column_sums = residual.sum(dim=1)  # (G, S, K)
        projected = torch.bmm(residual.view(n_groups, n_samples, -1).transpose(1, 2), self.X)
        projected = projected.view(n_groups, n_seeds, n_classes, n_features).transpose(2, 3)
        centred = projected - self.shift[..., None] * column_sums[:, :, None, :]
        grad_weights = centred / self.scale[..., None] + self.l2_strength[..., None, None] * weights
        grad = torch.cat([grad_weights, column_sums[:, :, None, :]], dim=2)
        grad = grad * self.free_columns[:, :, None, :]

        loss = nll + 0.5 * self.l2_strength * weights.square().sum(dim=(2, 3))
        return loss.reshape(-1), grad.reshape(n_groups * n_seeds, -1)

    def restrict(self, problems: torch.Tensor) -> tuple[_StackedLogisticObjective, torch.Tensor]:
        """The smallest sub-batch (whole groups x whole seeds) covering the masked problems.

        Returns it with the indices of its problems in this batch; it may include unmasked ones.
        """
        n_groups, n_seeds = self.shape[:2]
        mask = problems.view(n_groups, n_seeds)
        groups = mask.any(dim=1).nonzero().squeeze(1)
        seeds = mask.any(dim=0).nonzero().squeeze(1)
        kept = (groups[:, None] * n_seeds + seeds[None, :]).reshape(-1)
        if len(groups) == n_groups and len(seeds) == n_seeds:
            return self, kept

        def pick(tensor):
            return tensor[groups][:, seeds]

        sub = _StackedLogisticObjective(
            X=self.X if len(groups) == n_groups else self.X[groups],
            y=self.y[groups],
            sample_weight=self.sample_weight[seeds],
            shift=pick(self.shift),
            scale=pick(self.scale),
            l2_strength=pick(self.l2_strength),
            class_present=pick(self.class_present),
        )
        return sub, kept


def _minimise(
    objective: _StackedLogisticObjective, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve in float32 as far as float32 goes, then finish and verify in float64.

    float32 halves memory traffic and, on CPUs and most GPUs, runs the products several times
    faster; it usually gets to the gradient tolerance (or close) in the same number of steps. The
    float64 stage re-checks the tolerance on the exact objective, continues where needed and alone
    decides `converged`; both stages share the max_iter budget.
    """
    budget = torch.full(
        (objective.n_problems,), max_iter, dtype=torch.long, device=objective.X.device
    )
    rough = objective.to(torch.float32)
    theta, _, rough_iter, _, scale = _batched_lbfgs(
        rough, rough.initial_parameters(), budget, tol,
        line_search_steps=_ROUGH_LINE_SEARCH_STEPS, patience=_ROUGH_PATIENCE,
    )
    del rough
    exact = objective.X.dtype
    theta, converged, exact_iter, grad_max, _ = _batched_lbfgs(
        objective, theta.to(exact), budget - rough_iter, tol, initial_scale=scale.to(exact),
    )
    return theta, converged, rough_iter + exact_iter, grad_max


def _batched_lbfgs(
    objective: _StackedLogisticObjective,
    theta: torch.Tensor,
    budget: torch.Tensor,
    tol: float,
    *,
    initial_scale: torch.Tensor | None = None,
    line_search_steps: int = _MAX_LINE_SEARCH_STEPS,
    patience: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise a batch of independent smooth convex objectives with L-BFGS, vectorised.

    Every problem has its own curvature pairs, initial Hessian scale and backtracking Armijo step
    (unit step first, quadratic interpolation). A problem stops when its max-abs gradient is at
    most tol (converged); otherwise, reported as not converged, after budget[p] steps, when
    line_search_steps backtracks find no lower objective, or (with patience) when the gradient
    has not shrunk by 10 % for that many steps. Stopped problems are frozen, and the batch shrinks
    to the groups and seeds that still have running problems.
    Returns theta, converged, n_iter, grad_max and the last inverse-Hessian scale per problem.
    """
    n_problems, n_params = theta.shape
    device, dtype = theta.device, theta.dtype
    eps = torch.finfo(dtype).eps
    loss, grad = objective(theta)
    # Slot-major curvature pairs, so each slot is one contiguous (P, n_params) block.
    steps_s = torch.zeros(_HISTORY_SIZE, n_problems, n_params, dtype=dtype, device=device)
    steps_y = torch.zeros_like(steps_s)
    inverse_sy = torch.zeros(_HISTORY_SIZE, n_problems, dtype=dtype, device=device)
    if initial_scale is None:
        # A first step of length 1 along -grad, as scipy's L-BFGS-B takes.
        initial_scale = 1.0 / grad.norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    hessian_scale = initial_scale.clone()
    n_stored, next_slot = 0, 0

    final_theta = theta.clone()
    final_converged = torch.zeros(n_problems, dtype=torch.bool, device=device)
    final_iter = torch.zeros(n_problems, dtype=torch.long, device=device)
    final_grad = torch.zeros(n_problems, dtype=dtype, device=device)
    final_scale = hessian_scale.clone()

    original = torch.arange(n_problems, device=device)
    frozen = torch.zeros(n_problems, dtype=torch.bool, device=device)
    stuck = torch.zeros_like(frozen)
    best_grad = torch.full((n_problems,), math.inf, dtype=dtype, device=device)
    best_at = torch.zeros(n_problems, dtype=torch.long, device=device)
    for iteration in range(int(budget.max()) + 1):
        grad_max = grad.abs().amax(dim=1)
        improved = grad_max < 0.9 * best_grad
        best_grad = torch.where(improved, grad_max, best_grad)
        best_at = torch.where(improved, iteration, best_at)
        if patience is not None:
            stuck = stuck | (iteration - best_at >= patience)
        converged = grad_max <= tol
        finishing = ~frozen & (converged | stuck | (iteration >= budget[original]))
        if finishing.any():
            done = finishing.nonzero().squeeze(1)
            where = original[done]
            final_theta[where], final_converged[where] = theta[done], converged[done]
            final_iter[where], final_grad[where] = iteration, grad_max[done]
            final_scale[where] = hessian_scale[done]
            frozen = frozen | finishing
            if frozen.all():
                break
            sub, kept = objective.restrict(~frozen)
            if len(kept) < len(frozen):
                objective, original, frozen = sub, original[kept], frozen[kept]
                theta, loss, grad = theta[kept], loss[kept], grad[kept]
                steps_s, steps_y = steps_s[:, kept], steps_y[:, kept]
                inverse_sy = inverse_sy[:, kept]
                hessian_scale = hessian_scale[kept]
                best_grad, best_at = best_grad[kept], best_at[kept]
        running = ~frozen

        order = [(next_slot - 1 - back) % _HISTORY_SIZE for back in range(n_stored)]
        direction = -_two_loop(grad, steps_s, steps_y, inverse_sy, hessian_scale, order)
        slope = (grad * direction).sum(dim=1)
        not_descent = running & ~(slope < 0)
        if not_descent.any():
            # Rounding broke the quasi-Newton direction: forget this problem's history.
            inverse_sy[:, not_descent] = 0.0
            direction[not_descent] = -hessian_scale[not_descent, None] * grad[not_descent]
        direction[frozen] = 0.0
        slope = (grad * direction).sum(dim=1)

        step = torch.ones_like(loss)
        new_theta = theta + direction
        new_loss, new_grad = objective(new_theta)
        # A loss change within rounding noise counts as no increase, so the last digits of the
        # gradient can still be driven down instead of the search stalling on float noise (in
        # float32, patience ends the stage once that stops paying off).
        noise = 4 * eps * loss.abs()
        accepted = frozen | (new_loss <= loss + _ARMIJO_C1 * step * slope + noise)
        for _ in range(line_search_steps):
            if accepted.all():
                break
            retry = ~accepted
            tried = step[retry]
            rise = new_loss[retry] - loss[retry] - slope[retry] * tried
            minimiser = -slope[retry] * tried.square() / (2 * rise)
            step[retry] = torch.where(
                torch.isfinite(minimiser), minimiser.clamp(0.1 * tried, 0.5 * tried), 0.5 * tried
            )
            new_theta[retry] = theta[retry] + step[retry][:, None] * direction[retry]
            sub, kept = objective.restrict(retry)
            sub_loss, sub_grad = sub(new_theta[kept])
            update = retry[kept]
            new_loss[kept[update]], new_grad[kept[update]] = sub_loss[update], sub_grad[update]
            accepted = accepted | (new_loss <= loss + _ARMIJO_C1 * step * slope + noise)
        stuck = ~accepted
        new_theta[stuck], new_loss[stuck], new_grad[stuck] = theta[stuck], loss[stuck], grad[stuck]

        s, y = new_theta - theta, new_grad - grad
        sy, yy, ss = (s * y).sum(dim=1), (y * y).sum(dim=1), (s * s).sum(dim=1)
        usable = running & (sy > 1e-10 * (ss * yy).sqrt())
        steps_s[next_slot] = s
        steps_y[next_slot] = y
        inverse_sy[next_slot] = torch.where(usable, 1.0 / sy, torch.zeros_like(sy))
        hessian_scale = torch.where(usable, sy / yy, hessian_scale)
        next_slot = (next_slot + 1) % _HISTORY_SIZE
        n_stored = min(n_stored + 1, _HISTORY_SIZE)
        theta, loss, grad = new_theta, new_loss, new_grad

    return final_theta, final_converged, final_iter, final_grad, final_scale


def _two_loop(
    grad: torch.Tensor,
    steps_s: torch.Tensor,
    steps_y: torch.Tensor,
    inverse_sy: torch.Tensor,
    hessian_scale: torch.Tensor,
    order: list[int],
) -> torch.Tensor:
    """Inverse-Hessian approximation times grad; pairs with inverse_sy = 0 drop out exactly."""
    q = grad.clone()
    alphas = []
    for slot in order:  # newest first
        alpha = inverse_sy[slot] * torch.linalg.vecdot(steps_s[slot], q)
        q.sub_(alpha[:, None] * steps_y[slot])
        alphas.append(alpha)
    r = q.mul_(hessian_scale[:, None])
    for slot, alpha in zip(reversed(order), reversed(alphas)):
        beta = inverse_sy[slot] * torch.linalg.vecdot(steps_y[slot], r)
        r.add_((alpha - beta)[:, None] * steps_s[slot])
    return r


def retention(acc_final: float, acc_adapter: float, chance: float) -> float | None:
    """Share of the adapter's above-chance accuracy still there at the final norm (None when the
    adapter itself is at chance, where the ratio means nothing)."""
    above = acc_adapter - chance
    return (acc_final - chance) / above if above > 1e-9 else None
