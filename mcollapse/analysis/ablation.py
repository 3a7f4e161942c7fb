"""Mode ablation with controls that control (paper §5.4, Table 2, and what it lacks).

Treatments are sets of modes (rows of the eigenbasis, sorted by decreasing variance):
`ms_all` (every MS mode, the paper's), and count-matched both ways with k = min(#MS, #TA):
`ms_top` (the k MS modes of largest variance), `ta_top` (likewise TA) and `random_k` (k modes drawn
uniformly, several draws); optionally `ms_k` sweeps. Each is applied with every edit of
analysis.interventions.

Controls and references, per run:
- `swap` and `floor` (analysis.interventions): every Delta is also given as a fraction of Delta_swap,
  the total sample-specific use of the input; far above 1 means damage from leaving the data
  distribution, not use of information.
- `random_matched`: random subspaces of the kept modes' span of the treatment's dimension whose dose
  (variance removed) matches the treatment's (analysis.subspaces), with their overlap with it.
- the dose-response curve over random mode subsets, and each treatment's effect beyond its dose
  (analysis.dose_response).

Per-sample loss changes are tested with a paired t-test and given a cluster-bootstrap interval over
the dataset's groups (speaker, sentence), since samples sharing them are not independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcollapse.analysis import subspaces as sub
from mcollapse.analysis.interventions import DRAWN, aligned, edit
from mcollapse.analysis.stats import paired_t

TREATMENTS = ("ms_all", "ms_top", "ta_top", "random_k")


@dataclass(frozen=True)
class Condition:
    name: str  # ms_all | ms_top | ta_top | random_k | ms_k
    modes: tuple[int, ...]
    seed: int | None = None  # random_k draws
    k: int | None = None  # ms_k sweep

    @property
    def label(self) -> str:
        if self.seed is not None:
            return f"random_k_seed{self.seed}"
        if self.k is not None:
            return f"ms_top{self.k}"
        return self.name

    @property
    def group(self) -> str:
        """The summary row a condition belongs to (random draws pool into one)."""
        return self.label if self.name == "ms_k" else self.name


def conditions(is_ms: np.ndarray, eigenvalues: np.ndarray, *, n_random: int = 10, seed: int = 0,
               ms_k: list[int] | tuple[int, ...] = ()) -> list[Condition]:
    """The treatments over modes sorted by decreasing eigenvalue (see the module docstring). Draw r
    of random_k comes from its own generator seeded seed + r, so its label reproduces it alone.
    ms_top is left out when it equals ms_all (#MS <= #TA)."""
    is_ms = np.asarray(is_ms, dtype=bool)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if is_ms.shape != lam.shape:
        raise ValueError(f"is_ms {is_ms.shape} and eigenvalues {lam.shape} differ")
    by_variance = np.argsort(-lam, kind="stable")
    ms = [int(i) for i in by_variance if is_ms[i]]
    ta = [int(i) for i in by_variance if not is_ms[i]]
    out: list[Condition] = []
    if not ms:
        return out
    out.append(Condition("ms_all", tuple(sorted(ms))))
    k = min(len(ms), len(ta))
    if k:
        if k < len(ms):
            out.append(Condition("ms_top", tuple(sorted(ms[:k]))))
        out.append(Condition("ta_top", tuple(sorted(ta[:k]))))
        for r in range(n_random):
            drawn = np.random.default_rng(seed + r).choice(lam.size, size=k, replace=False)
            out.append(Condition("random_k", tuple(sorted(int(i) for i in drawn)), seed=seed + r))
    for size in ms_k:
        if 0 < int(size) <= len(ms):
            out.append(Condition("ms_k", tuple(sorted(ms[: int(size)])), k=int(size)))
    return out


def empty_controls(is_ms: np.ndarray, n_random: int) -> list[str]:
    """Treatments that `conditions` leaves out because their modes do not exist."""
    is_ms = np.asarray(is_ms, dtype=bool)
    if not is_ms.any():
        return list(TREATMENTS[:1]) + ["ta_top"] + (["random_k"] if n_random > 0 else [])
    return [] if (~is_ms).any() else ["ta_top"] + (["random_k"] if n_random > 0 else [])


def project_out(z: torch.Tensor, modes: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Remove the span of the rows of `modes` (k, d) from every position of z (..., d): around
    `mean` (centred) or the raw component (uncentred)."""
    if modes.numel() == 0:
        return z
    anchor = z if mean is None else z - mean
    return z - (anchor @ modes.T) @ modes


def variance_share(eigenvalues: np.ndarray, modes) -> float:
    """Share of the kept modes' pooled variance that a set of modes holds."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return float(lam[list(modes)].sum() / lam.sum()) if len(modes) else 0.0


def summarise(baseline: np.ndarray, ablated: np.ndarray, *, confidence: float = 0.95) -> dict:
    """Loss change of one condition against no edit over the same samples: paired t-test, CI of the
    mean change, and the change in % of the mean baseline loss."""
    base = np.asarray(baseline, dtype=np.float64)
    test = paired_t(np.asarray(ablated, dtype=np.float64), base, confidence=confidence)
    mean_base = float(base.mean())
    scale = 100.0 / mean_base if mean_base != 0 else float("nan")
    return {
        "n": test["n"], "mean_loss_baseline": mean_base, "mean_loss": float(np.mean(ablated)),
        "delta_loss": test["mean"], "delta_loss_std": test["std"], "delta_pct": test["mean"] * scale,
        "delta_ci_low": test["ci_low"], "delta_ci_high": test["ci_high"], "delta_pct_ci_low": test["ci_low"] * scale,
        "delta_pct_ci_high": test["ci_high"] * scale, "t": test["t"], "p": test["p"],
    }


# ---------------------------------------------------------------------------------------------
# The plan: every subspace and every loss column of a run, fixed before any forward pass


@dataclass
class Subspace:
    name: str
    role: str  # treatment | matched | dose
    coords: np.ndarray  # (k, K) orthonormal rows in mode coordinates
    pooled_share: float  # of the pooled variance (all of it, not only the kept modes')
    token_share: float  # of the token-level variance: the dose the decoder sees
    of: str | None = None  # matched: the treatment group it controls
    condition: Condition | None = None


@dataclass(frozen=True)
class Column:
    label: str
    variant: str  # baseline | swap | floor | one of interventions.VARIANTS
    subspace: str | None = None
    draw: int | None = None  # which partner draw (swap, resample)


@dataclass
class Plan:
    subspaces: dict[str, Subspace]
    columns: list[Column]
    matched_draws: dict[str, dict]  # treatment group -> {accepted, tried, beta, target}
    dose: str  # token | pooled: the dose matched and plotted

    def dose_of(self, s: Subspace) -> float:
        return s.token_share if self.dose == "token" else s.pooled_share


def build_plan(conds: list[Condition], basis_vectors: np.ndarray, eigenvalues: np.ndarray, pooled_total: float,
               token_cov: np.ndarray, token_total: float, *, variants, n_draws: int, control_variants, n_matched: int,
               dose_variants, n_dose: int, dose: str = "token", tolerance: float = 0.02, seed: int = 0) -> Plan:
    """Subspaces and loss columns of a run. Treatments get every variant (resample and swap one
    column per partner draw); dose-matched controls and dose-curve subsets get the control and
    dose variants (resample with draw r mod n_draws, so averaging over subspaces also averages
    over partners)."""
    n_modes = basis_vectors.shape[0]
    pooled_cov = np.diag(np.asarray(eigenvalues, dtype=np.float64))

    def make(name, role, coords, **extra) -> Subspace:
        return Subspace(name, role, coords, sub.share(coords, pooled_cov, pooled_total),
                        sub.share(coords, token_cov, token_total), **extra)

    spaces: dict[str, Subspace] = {}
    for cond in conds:
        spaces[cond.label] = make(cond.label, "treatment", sub.mode_subset(cond.modes, n_modes), condition=cond)
    matched_draws: dict[str, dict] = {}
    groups = {c.group: c for c in conds if c.name != "random_k"}
    dose_cov, dose_total = (token_cov, token_total) if dose == "token" else (pooled_cov, pooled_total)
    for g, (group, cond) in enumerate(groups.items()):
        target = spaces[cond.label]
        aim = target.token_share if dose == "token" else target.pooled_share
        if n_matched == 0 or aim <= 0:
            continue
        drawn = sub.dose_matched_subspaces(len(cond.modes), aim, dose_cov, dose_total, n_matched,
                                           seed=seed * 1000 + g, tolerance=tolerance)
        matched_draws[group] = {"accepted": drawn.accepted, "tried": drawn.tried, "tilt_beta": drawn.beta,
                                "target_dose": aim, "tolerance": tolerance,
                                "overlap_with_condition": float(np.mean([sub.overlap(v, target.coords)
                                                                         for v in drawn.subspaces]))
                                if drawn.accepted else None}
        for r, coords in enumerate(drawn.subspaces):
            spaces[f"random_matched:{group}#{r}"] = make(f"random_matched:{group}#{r}", "matched", coords, of=group)
    for r, modes in enumerate(sub.random_subsets(n_modes, n_dose, seed)):
        spaces[f"dose#{r}"] = make(f"dose#{r}", "dose", sub.mode_subset(modes, n_modes))

    columns = [Column("baseline", "baseline")]
    columns += [Column(f"swap/draw{d}", "swap", draw=d) for d in range(n_draws)] + [Column("floor", "floor")]
    for s in spaces.values():
        chosen = variants if s.role == "treatment" else control_variants if s.role == "matched" else dose_variants
        r = int(s.name.split("#")[-1]) if "#" in s.name else 0
        several = s.role != "treatment" or s.condition.name == "random_k"  # one of many subspaces of its row
        if several and s.role == "treatment":
            r = s.condition.seed - min(c.seed for c in conds if c.name == "random_k")
        for v in chosen:
            if v in DRAWN and not several:
                columns += [Column(f"{v}/{s.name}/draw{d}", v, s.name, d) for d in range(n_draws)]
            elif v in DRAWN:  # averaging over the subspaces also averages over the partners
                columns.append(Column(f"{v}/{s.name}", v, s.name, r % n_draws))
            elif v == "optimal" and several:
                continue  # fitted constants are for the named treatments only
            else:
                columns.append(Column(f"{v}/{s.name}", v, s.name))
    return Plan(spaces, columns, matched_draws, dose)


@dataclass
class EditContext:
    """What the edits need beyond the sample itself: directions, means, partners, fitted constants."""

    directions: dict[str, torch.Tensor]  # subspace name -> U (k, d) in model space
    mean: torch.Tensor  # the pooled modal mean m (d,)
    partners: np.ndarray  # (n_draws, n): row index of sample i's partner in each draw
    arrays: list[np.ndarray]  # the scored samples' inputs, by row
    position_means: dict[int, torch.Tensor]  # length -> mu (T, d)
    constants: dict[str, torch.Tensor]  # subspace name -> fitted constant (optimal)
    fit_rows: frozenset[int] = frozenset()  # rows that fitted the constants: optimal is not scored there

    def input(self, row: int, column: Column) -> torch.Tensor | None:
        """The edited input of sample `row` under `column`; None where the column is not scored."""
        z = torch.as_tensor(self.arrays[row], dtype=torch.float32)
        if column.variant == "baseline":
            return z
        partner = None
        if column.draw is not None:
            other = self.arrays[int(self.partners[column.draw, row])]
            partner = torch.as_tensor(other if column.variant == "swap" else aligned(other, len(z)),
                                      dtype=torch.float32)
        if column.variant in ("swap", "floor"):
            return edit(z, z[:0], column.variant, mean=self.mean, partner=partner)
        if column.variant == "optimal":
            if row in self.fit_rows or column.subspace not in self.constants:
                return None
            constant = self.constants[column.subspace]
            constant = aligned(constant.numpy(), len(z)) if constant.shape[0] > 1 else constant.numpy()
            return edit(z, self.directions[column.subspace], "optimal", constant=torch.as_tensor(constant))
        return edit(z, self.directions[column.subspace], column.variant, mean=self.mean, partner=partner,
                    position_means=self.position_means.get(len(z)))


def loss_table(context: EditContext, rows, columns: list[Column], score, per_forward: int) -> np.ndarray:
    """-log q(y | edited z) of each sample in `rows` under every column, (len(rows), len(columns)),
    nan where a column is not scored; `score(zs, rows)` scores at most `per_forward` inputs a call."""
    out = np.full((len(rows), len(columns)), np.nan)
    items = []
    for n, r in enumerate(rows):
        for c, column in enumerate(columns):
            z = context.input(int(r), column)
            if z is not None:
                items.append((n, int(r), c, z))
    for start in range(0, len(items), per_forward):
        part = items[start : start + per_forward]
        values = score([z for *_, z in part], [r for _, r, _, _ in part])
        for (n, _, c, _), value in zip(part, values):
            out[n, c] = -float(value)
    return out


def prepare(arrays: list[np.ndarray], vectors: np.ndarray, eigenvalues: np.ndarray, mean: np.ndarray,
            pooled_total: float, is_ms: np.ndarray, *, seed: int, n_random: int, ms_k, variants, n_draws: int,
            control_variants, n_matched: int, dose_variants, n_dose: int, dose: str = "token",
            tolerance: float = 0.02, avoid=None) -> tuple[list[Condition], Plan, EditContext]:
    """The treatments, the plan and the edit context for the scored samples' inputs `arrays`, given
    the eigenbasis (vectors (K, d), eigenvalues, mean, total pooled variance) and its MS labels.
    `avoid` (per sample, e.g. the target text) keeps partners from sharing the scored answer."""
    from mcollapse.analysis.interventions import partners, position_mean

    conds = conditions(is_ms, eigenvalues, n_random=n_random, seed=seed, ms_k=ms_k)
    token_cov, token_total, _ = sub.token_covariance(arrays, vectors)
    plan = build_plan(conds, vectors, eigenvalues, pooled_total, token_cov, token_total, variants=variants,
                      n_draws=n_draws, control_variants=control_variants, n_matched=n_matched,
                      dose_variants=dose_variants, n_dose=n_dose, dose=dose, tolerance=tolerance, seed=seed)
    basis_t = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
    directions = {name: torch.as_tensor(s.coords, dtype=torch.float32) @ basis_t for name, s in plan.subspaces.items()}
    uses_means = "position_mean" in set(variants) | set(control_variants) | set(dose_variants)
    lengths = sorted({len(a) for a in arrays}) if uses_means else []
    means = {t: torch.as_tensor(position_mean(arrays, t), dtype=torch.float32) for t in lengths}
    fit_rows: frozenset[int] = frozenset()
    if "optimal" in variants:
        order = np.random.default_rng([seed, 41]).permutation(len(arrays))
        fit_rows = frozenset(int(i) for i in order[: len(arrays) // 2])
    context = EditContext(directions, torch.as_tensor(np.asarray(mean), dtype=torch.float32),
                          partners(len(arrays), n_draws, seed, avoid), list(arrays), means, {}, fit_rows)
    return conds, plan, context


def optimal_targets(plan: Plan) -> list[str]:
    """The subspaces that get a fitted constant: every treatment but the random_k draws."""
    return [n for n, s in plan.subspaces.items() if s.role == "treatment" and s.condition.name != "random_k"]


def fit_constants(plan: Plan, context: EditContext, score, *, steps: int, batch: int, lr: float,
                  seed: int) -> dict[str, dict]:
    """Fit the `optimal` constant of each target subspace on the fit half (context.fit_rows): one per
    position when every input has the same length (image patches), else one for all positions.
    `score(list of inputs, rows)` must be differentiable. Returns name -> {constant, curve}."""
    from mcollapse.analysis.interventions import fit_constant, position_mean

    rows = sorted(context.fit_rows)
    zs = [torch.as_tensor(context.arrays[r], dtype=torch.float32) for r in rows]
    lengths = {len(z) for z in zs}
    per_position = len(lengths) == 1 and len({len(a) for a in context.arrays}) == 1
    anchor = torch.as_tensor(position_mean([context.arrays[r] for r in rows], lengths.pop()), dtype=torch.float32) \
        if per_position else context.mean[None]
    from mcollapse.progress import progress_bar

    out = {}
    targets = optimal_targets(plan)
    with progress_bar("optimal constants", total=steps * len(targets)) as advance:
        for name in targets:
            u = context.directions[name]
            constant, curve = fit_constant(lambda edited, idx: score(edited, [rows[i] for i in idx]), zs, u,
                                           per_position, anchor @ u.T, steps=steps, batch=batch, lr=lr, seed=seed,
                                           advance=advance)
            out[name] = {"constant": constant, "curve": curve}
    return out
