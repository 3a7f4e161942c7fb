"""The ablation's loss table turned into its verdict: every condition's loss change with a paired
t-test and a cluster-bootstrap interval, as a fraction of the swap reference, beside its dose-matched
random control, and its effect beyond the dose-response curve of random mode subsets."""

from __future__ import annotations

import numpy as np

from mcollapse.analysis.ablation import Plan, summarise
from mcollapse.analysis.dose_response import class_effects
from mcollapse.analysis.stats import cluster_bootstrap_mean


def _per_sample(table: np.ndarray, indices: list[int]) -> np.ndarray:
    """Per-sample loss change against the baseline, averaged over the columns; nan where unscored."""
    if not indices:
        return np.full(table.shape[0], np.nan)
    with np.errstate(invalid="ignore"):
        return np.mean(table[:, indices] - table[:, :1], axis=1)


def _clusters_at(clusters, rows: np.ndarray):
    return [np.asarray(c, dtype=object)[rows] for c in clusters] if clusters else None


def _stats(delta: np.ndarray, base: np.ndarray, swap: np.ndarray, clusters, n_resamples: int, seed: int) -> dict:
    rows = np.flatnonzero(np.isfinite(delta))
    if rows.size < 2:
        return {"n": int(rows.size)}
    out = summarise(base[rows], base[rows] + delta[rows])
    ci = cluster_bootstrap_mean(delta[rows], _clusters_at(clusters, rows), n_resamples=n_resamples, seed=seed)
    swap_mean = float(np.mean(swap[rows]))
    out.update({"delta_cluster_ci_low": ci["ci_low"], "delta_cluster_ci_high": ci["ci_high"],
                "n_clusters": ci["n_clusters"], "delta_swap_same_samples": swap_mean,
                "frac_of_swap": float(out["delta_loss"] / swap_mean) if swap_mean != 0 else float("nan")})
    return out


def summaries(table: np.ndarray, plan: Plan, clusters, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """`results` (one entry per reference, treatment x variant and matched control x variant),
    `delta_swap`, `dose_curves` (per dose variant: coefficients and points) and `dose_points` (rows
    of dose_response.csv)."""
    columns = plan.columns
    base = table[:, 0]
    by = {}
    for c, column in enumerate(columns):
        by.setdefault((column.variant, column.subspace), []).append(c)
    swap = _per_sample(table, by[("swap", None)])
    results = []

    def add(entry: dict, delta: np.ndarray) -> dict:
        entry.update(_stats(delta, base, swap, clusters, n_resamples, seed))
        results.append(entry)
        return entry

    add({"condition": "swap", "variant": "swap", "class": "reference", "n_draws": len(by[("swap", None)])}, swap)
    add({"condition": "floor", "variant": "floor", "class": "reference"}, _per_sample(table, by[("floor", None)]))

    treatments: dict[str, list] = {}
    for space in plan.subspaces.values():
        if space.role == "treatment":
            treatments.setdefault(space.condition.group, []).append(space)
    variants = list(dict.fromkeys(c.variant for c in columns if c.subspace and plan.subspaces[c.subspace].role
                                  == "treatment"))
    deltas: dict[tuple[str, str], np.ndarray] = {}
    for variant in variants:
        for group, members in treatments.items():
            indices = [c for s in members for c in by.get((variant, s.name), [])]
            if not indices:
                continue
            delta = _per_sample(table, indices)
            deltas[(group, variant)] = delta
            klass = {"ms_all": "MS", "ms_top": "MS", "ta_top": "TA", "random_k": "random"}.get(group, "MS")
            entry = add({"condition": group, "variant": variant, "class": klass,
                         "n_modes_removed": len(members[0].condition.modes), "n_columns": len(indices),
                         "n_subspaces": len(members),
                         "variance_share_removed": float(np.mean([s.pooled_share for s in members])),
                         "variance_share_removed_token": float(np.mean([s.token_share for s in members]))}, delta)
            matched = [s for s in plan.subspaces.values() if s.role == "matched" and s.of == group]
            m_indices = [c for s in matched for c in by.get((variant, s.name), [])]
            if not m_indices:
                continue
            m_delta = _per_sample(table, m_indices)
            info = plan.matched_draws.get(group, {})
            add({"condition": f"random_matched:{group}", "variant": variant, "class": "random_matched",
                 "n_modes_removed": len(members[0].condition.modes), "n_subspaces": len(matched),
                 "draws_tried": info.get("tried"), "tilt_beta": info.get("tilt_beta"),
                 "overlap_with_condition": info.get("overlap_with_condition"),
                 "variance_share_removed": float(np.mean([s.pooled_share for s in matched])),
                 "variance_share_removed_token": float(np.mean([s.token_share for s in matched]))}, m_delta)
            rows = np.flatnonzero(np.isfinite(delta) & np.isfinite(m_delta))
            if rows.size >= 2:
                diff = cluster_bootstrap_mean((delta - m_delta)[rows], _clusters_at(clusters, rows),
                                              n_resamples=n_resamples, seed=seed)
                entry.update({"delta_minus_matched": diff["estimate"], "delta_minus_matched_ci_low": diff["ci_low"],
                              "delta_minus_matched_ci_high": diff["ci_high"]})

    curves, points = {}, []
    dose_spaces = [s for s in plan.subspaces.values() if s.role == "dose"]
    for variant in dict.fromkeys(c.variant for c in columns if c.subspace and plan.subspaces[c.subspace].role
                                 == "dose"):
        spaces = [s for s in dose_spaces if (variant, s.name) in by]
        point_deltas = np.stack([_per_sample(table, by[(variant, s.name)]) for s in spaces], axis=1)
        for s, column in zip(spaces, point_deltas.T):
            points.append({"variant": variant, "subspace": s.name, "n_modes": s.coords.shape[0],
                           "dose_token": s.token_share, "dose_pooled": s.pooled_share,
                           "delta_loss": float(np.nanmean(column))})
        groups = [g for g in treatments if (g, variant) in deltas]
        rows = np.flatnonzero(np.all(np.isfinite(point_deltas), axis=1))
        if len(spaces) < 2 or not groups or rows.size < 2:
            continue
        class_deltas = np.stack([deltas[(g, variant)] for g in groups], axis=1)
        rows = rows[np.all(np.isfinite(class_deltas[rows]), axis=1)]
        effects = class_effects(point_deltas[rows], [plan.dose_of(s) for s in spaces], class_deltas[rows],
                                [np.mean([plan.dose_of(s) for s in treatments[g]]) for g in groups],
                                _clusters_at(clusters, rows), n_resamples=n_resamples, seed=seed)
        curves[variant] = {"coef": effects["coef"], "n_points": effects["n_points"], "dose": plan.dose}
        for g, effect in zip(groups, effects["effects"]):
            entry = next(e for e in results if e["condition"] == g and e["variant"] == variant)
            entry.update({"class_effect": effect["effect"], "class_effect_ci_low": effect["ci_low"],
                          "class_effect_ci_high": effect["ci_high"],
                          "class_effect_extrapolated": effect["extrapolated"]})
    return {"results": results, "delta_swap": float(np.nanmean(swap)), "dose_curves": curves, "dose_points": points}
