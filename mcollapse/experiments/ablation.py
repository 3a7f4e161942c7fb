"""Causal ablation (paper §5.4, Table 2), with edits that stay on the data distribution and controls
that control (analysis.ablation).

The LLM alone scores the target for the unedited input and for every column of the plan: the
references (swap, floor), each treatment (MS, TA, count-matched random) under each edit
(resample, position_mean, optimal, centred, uncentred), dose-matched random subspaces and the random
mode subsets of the dose-response curve; columns of a batch are stacked as rows of one forward.
Per-sample loss = -log q(y | z, c) with the run's target (`target=content` by default;
`target=reference` is the paper's prompt-token loss).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.ablation import empty_controls, fit_constants, loss_table, optimal_targets, prepare
from mcollapse.analysis.ablation_summary import summaries
from mcollapse.analysis.interventions import REFERENCES, VARIANTS
from mcollapse.errors import UserError
from mcollapse.models.decoder import compose, pad_sequences
from mcollapse.pipeline.clusters import cluster_labels
from mcollapse.pipeline.decoder_side import batch_size_of, scored_ids
from mcollapse.pipeline.mode_edits import cached_constants, cached_pass, start_mode_edits
from mcollapse.report.decoder_figures import ablation_figure, dose_response_figure, print_ablation_table

log = logging.getLogger(__name__)

DOSES = ("token", "pooled")


def _check(exp) -> None:
    for name in ("variants", "control_variants", "dose_variants"):
        unknown = set(exp[name]) - set(VARIANTS)
        if unknown:
            raise UserError(f"experiment.{name} must be a subset of {list(VARIANTS)}, got {list(exp[name])}")
    if not exp.variants:
        raise UserError(f"experiment.variants must not be empty; choose from {list(VARIANTS)}")
    if "optimal" in exp.control_variants or "optimal" in exp.dose_variants:
        raise UserError("the optimal edit is fitted per treatment: leave it out of experiment.control_variants "
                        "and experiment.dose_variants")
    if exp.dose not in DOSES:
        raise UserError(f"experiment.dose must be one of {', '.join(DOSES)}, got {exp.dose!r}")
    if not 0 < exp.dose_tolerance < 1:
        raise UserError(f"experiment.dose_tolerance must lie in (0, 1), got {exp.dose_tolerance}")


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    _check(exp)
    edits = start_mode_edits(cfg, run_dir)
    rec, inputs = edits.rec, edits.inputs
    basis, alignment, basis_source = edits.basis, edits.alignment, edits.basis_source
    if alignment.n_ms == 0:
        raise UserError(f"no MS mode among the {alignment.rho.size} modes (ms_threshold={alignment.ms_threshold}, "
                        f"rho_normalization={alignment.rho_normalization}): nothing to ablate")
    empty = empty_controls(alignment.is_ms, exp.n_random)
    for name in empty:
        log.warning("ablation: condition %s is empty (%d MS, %d TA modes) and left out of the results",
                    name, alignment.n_ms, alignment.n_ta)
    ids = scored_ids(inputs, target.name, exp.n_samples, rec)
    if len(ids) < 4:
        raise UserError(f"the ablation needs at least 4 scored samples (two halves for the optimal edit, another "
                        f"sample's input for resample and swap), found {len(ids)}")
    seqs = inputs.sequences.subset(ids)
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    avoid = [inputs.texts[i].strip().lower() for i in ids] if target.name == "content" else None
    clusters, cluster_info = cluster_labels([inputs.records[i] for i in ids], list(cfg.stats.cluster_by))
    with rec.stage("plan"):
        conds, plan, context = prepare(seqs.arrays, basis.vectors, basis.eigenvalues, basis.mean,
                                       basis.total_variance, alignment.is_ms, seed=cfg.seed, n_random=exp.n_random,
                                       ms_k=list(exp.ms_k), variants=list(exp.variants), n_draws=exp.n_draws,
                                       control_variants=list(exp.control_variants), n_matched=exp.n_matched,
                                       dose_variants=list(exp.dose_variants), n_dose=exp.n_dose, dose=exp.dose,
                                       tolerance=exp.dose_tolerance, avoid=avoid)
    batch = batch_size_of(cfg)
    per_forward = exp.rows_per_forward or 4 * batch

    def score(zs, sample_rows):
        targets = [answers[r] for r in sample_rows] if answers else None
        rows_batch = compose(inputs.family, [len(z) for z in zs], targets, target.name, target.reduction)
        return inputs.decoder.scores(rows_batch, pad_sequences(zs))

    def score_values(zs, sample_rows):
        with torch.no_grad():
            return score(zs, sample_rows).double().cpu().numpy()

    plan_key = _digest(*(s.coords.ravel() for s in plan.subspaces.values()), context.partners.ravel(),
                       sorted(context.fit_rows))
    fits = {}
    if "optimal" in exp.variants and optimal_targets(plan):
        settings = {"steps": exp.optimal_steps, "batch": exp.optimal_batch, "lr": exp.optimal_lr, "seed": cfg.seed}
        fits = cached_constants(cfg, edits, ids, plan_key, settings,
                                lambda: fit_constants(plan, context, score, **settings))
        context.constants.update({name: torch.as_tensor(f["constant"]) for name, f in fits.items()})
    constants_key = _digest(*(np.asarray(f["constant"]).ravel() for f in fits.values())) if fits else None

    def losses(rows):
        return {"losses": loss_table(context, rows, plan.columns, score_values, per_forward)}

    order = np.argsort([len(a) for a in seqs.arrays], kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    table = cached_pass(cfg, edits, "ablation", ids, batches, losses, plan=plan_key, constants=constants_key,
                        columns=[c.label for c in plan.columns])("losses")

    with rec.stage("statistics"):
        out = summaries(table, plan, clusters, n_resamples=cfg.stats.n_boot, seed=cfg.seed)
    results = out["results"]
    swap = next(r for r in results if r["condition"] == "swap")
    if not swap.get("delta_cluster_ci_low", 0) > 0:
        log.warning("ablation: swapping the whole input does not raise the loss (Δ_swap %.3g, 95 %% CI %.3g to %.3g): "
                    "the decoder uses nothing sample-specific here, so frac_of_swap is not a fraction of anything",
                    swap.get("delta_loss", float("nan")), swap.get("delta_cluster_ci_low", float("nan")),
                    swap.get("delta_cluster_ci_high", float("nan")))
    rows = [rec.row("adapter_output", "-", cfg.seed, metric, value, condition=r["condition"], variant=r["variant"],
                    target=target.name, reduction=target.reduction)
            for r in results for metric, value in r.items()
            if metric not in ("condition", "variant", "class") and isinstance(value, (int, float))
            and not isinstance(value, bool)]
    summary = {"target": target.name, "reduction": target.reduction, "n_samples": len(ids),
               "n_modes": int(alignment.rho.size), "n_ms": alignment.n_ms, "n_ta": alignment.n_ta,
               "ms_threshold": alignment.ms_threshold, "rho_normalization": alignment.rho_normalization,
               "empty_conditions": empty, "eigenbasis": basis_source, "eigenbasis_fitted_on": basis.n_samples,
               "mean_loss_baseline": float(np.mean(table[:, 0])), "delta_swap": out["delta_swap"],
               "delta_swap_ci_low": swap.get("delta_cluster_ci_low"),
               "delta_swap_ci_high": swap.get("delta_cluster_ci_high"),
               # frac_of_swap means something only when the swap itself costs: its interval above 0
               "frac_of_swap_readable": bool(swap.get("delta_cluster_ci_low", 0) > 0),
               "delta_floor": next(r["delta_loss"] for r in results if r["condition"] == "floor"),
               "variants": list(exp.variants), "references": list(REFERENCES), "n_draws": exp.n_draws,
               "dose": exp.dose, "dose_curves": out["dose_curves"], "matched_controls": plan.matched_draws,
               "clusters": cluster_info, "n_columns": len(plan.columns),
               "optimal": {"n_fit": len(context.fit_rows), "n_scored": len(ids) - len(context.fit_rows),
                           "final_fit_loss": {n: f["curve"][-1] for n, f in fits.items() if f["curve"]}}
               if fits else None,
               "conditions": results}
    with rec.stage("report"):
        with (run_dir / "per_sample.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", *(f"loss_{c.label}" for c in plan.columns)])
            for i, sample_id in enumerate(ids):
                writer.writerow([sample_id, *("" if np.isnan(v) else f"{v:.8g}" for v in table[i])])
        with (run_dir / "dose_response.csv").open("w", newline="") as handle:
            fields = ["variant", "subspace", "kind", "n_modes", "dose_token", "dose_pooled", "delta_loss"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for p in out["dose_points"]:
                writer.writerow({**p, "kind": "random_subset"})
            for r in results:
                if "variance_share_removed_token" in r and "delta_loss" in r:
                    writer.writerow({"variant": r["variant"], "subspace": r["condition"], "kind": r["class"],
                                     "n_modes": r.get("n_modes_removed"),
                                     "dose_token": r["variance_share_removed_token"],
                                     "dose_pooled": r["variance_share_removed"], "delta_loss": r["delta_loss"]})
        title = f"{cfg.model.name} x {cfg.dataset.name} (target={target.name}, n={len(ids)})"
        ablation_figure(results, run_dir / "ablation.png", title)
        dose_response_figure(out["dose_points"], results, out["dose_curves"], run_dir / "dose_response.png", title)
    rec.write(rows, summary)
    print_ablation_table(results, f"ablation: {cfg.model.name} x {cfg.dataset.name} (target={target.name})")
    return summary
