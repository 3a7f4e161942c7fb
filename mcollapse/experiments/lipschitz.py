"""L_log: how fast the decoder's log-score moves with the representation it is fed (Assumption 2).

Per sample, ||grad_z log q(y | z, c)||_F with z the whole adapter-output sequence (the LLM's input
at the modality positions), from one LLM-only backward per batch. D and D_eff (§A.3) are measured
on the pooled adapter outputs (D_S also over the union with the pooled text embeddings); note that
L is a norm over the unpooled sequence, so L x D mixes two spaces exactly as the paper does;
L_pooled (the gradient w.r.t. a shift shared by all positions) is the estimate in the pooled space
of D. The paper's secant (k-NN) L over pairs of equal sequence length is reported beside it as a
derivative-free cross-check, and D_reference is the earlier code's D. The per-sample gradients'
magnitudes along the modes are kept for gradproj.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from mcollapse.analysis.lipschitz import (
    diameter,
    equal_length_neighbours,
    gradient_norm_histogram,
    gradient_norm_stats,
    lipschitz_summary,
    reference_diameter,
    secant_lipschitz,
)
from mcollapse.errors import UserError
from mcollapse.pipeline.decoder_side import (
    decoder_inputs,
    gradient_batch_size,
    gradients,
    lipschitz_summary_entry,
    scored_ids,
    secant_scores,
    shared_modes,
)
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.report.decoder_figures import lipschitz_histogram, print_metrics
from mcollapse.store import write_json

log = logging.getLogger(__name__)

SHOWN = ["n_samples", "L_mean", "L_median", "L_p95", "L_max", "L_pooled_mean", "L_pooled_p95", "L_secant_median",
         "L_secant_max", "n_secant", "D", "D_reference", "D_eff", "participation_ratio", "D_S", "L_mean_x_D",
         "L_p95_x_D", "L_mean_x_D_eff", "L_p95_x_D_eff", "mean_scored_tokens"]


def _secant_check(inputs, ids: list[str], target, batch_size: int, n: int, k: int) -> tuple[dict, np.ndarray]:
    """The paper's k-NN secant L over the first n scored samples, pairing only equal lengths:
    summary fields and per-sample slopes (NaN: no neighbour of the same length)."""
    chosen = ids[:n]
    neighbours, dist = equal_length_neighbours(inputs.sequences.subset(chosen).arrays, k)
    own, other = secant_scores(inputs, chosen, neighbours, target, batch_size)
    slopes = secant_lipschitz(own, other, dist)
    found = slopes[np.isfinite(slopes)]
    out = {"n_secant": int(found.size), "n_secant_without_neighbour": int(len(chosen) - found.size),
           "secant_neighbours": k}
    if found.size:
        stats = gradient_norm_stats(found)
        out.update({f"L_secant_{key}": stats[key] for key in ("mean", "median", "p95", "max")})
    return out, slopes


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    n_secant, k_secant = exp.secant_samples, exp.secant_neighbours
    if n_secant < 0 or k_secant < 1:
        raise UserError(f"experiment.secant_samples must be >= 0 and secant_neighbours >= 1, got {n_secant} and "
                        f"{k_secant}")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    ids = scored_ids(inputs, target.name, cfg.gradients.n_samples, rec)
    mode_set = None
    if len(inputs.with_text()) >= 3:
        mode_set = shared_modes(cfg, inputs, rec)
    else:
        log.info("fewer than 3 texts: gradient projections on the modes are not stored")
    grads = gradients(inputs, rec, ids, target, gradient_batch_size(cfg), mode_set)
    secant, slopes = {}, np.full(0, np.nan)
    if n_secant:
        with rec.stage("secant"):
            secant, slopes = _secant_check(inputs, ids, target, gradient_batch_size(cfg), n_secant, k_secant)

    with rec.stage("statistics"):
        pooled = inputs.sequences.pooled()
        summary = lipschitz_summary(grads.norms, pooled, robust_quantile=exp.robust_quantile,
                                    seed=cfg.seed)
        text_ids = inputs.with_text()
        if text_ids:
            text = np.stack([inputs.text_sequence(i).astype(np.float64).mean(axis=0) for i in text_ids])
            summary["D_S"] = diameter(np.vstack([pooled, text]))
        summary.update({f"L_pooled_{key}": value for key, value in gradient_norm_stats(grads.shift_norms).items()
                        if key in ("mean", "median", "p95", "max")})
        summary.update(secant)
        summary["D_reference"] = reference_diameter(pooled)
        summary.update({"n_samples": len(ids), "n_pooled_for_D": len(pooled),
                        "mean_scored_tokens": float(grads.n_scored.mean()),
                        "mean_positions": float(grads.lengths.mean()), "mean_score": float(np.mean(grads.scores)),
                        "target": target.name, "reduction": target.reduction, "L_space": "adapter_output",
                        "selection_digest": selection.digest})
    rows = [rec.row("adapter_output", "-", cfg.seed, name, value, target=target.name,
                    reduction=target.reduction)
            for name, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    with rec.stage("report"):
        _per_sample_csv(run_dir / "per_sample.csv", grads, slopes)
        title = f"{cfg.model.name} x {cfg.dataset.name} (target={target.name}, {target.reduction})"
        stats = {k: summary[f"L_{k}"] for k in ("mean", "median", "p95", "max")}
        lipschitz_histogram(grads.norms, stats, run_dir / "lipschitz_hist.png", title, exp.histogram_bins)
    details = {"histogram": gradient_norm_histogram(grads.norms, exp.histogram_bins),
               "modes_artifact": str(mode_set.path) if mode_set else None}
    rec.write(rows, summary, details)
    write_json(lipschitz_summary_entry(inputs.cache_dir, cfg.model, inputs.dataset, target).path,
               {**summary, "run_dir": str(run_dir), "model": cfg.model.name, "dataset": cfg.dataset.name})
    print_metrics(f"L_log: {cfg.model.name} x {cfg.dataset.name} (target={target.name})", summary, SHOWN)
    return summary


def _per_sample_csv(path: Path, grads, secant_slopes: np.ndarray) -> None:
    """One row per scored sample; secant_slope is empty past the secant check's samples or where the
    sample has no neighbour of its length."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "grad_norm", "shift_grad_norm", "secant_slope", "log_score", "n_scored_tokens",
                         "n_positions"])
        for i, sample_id in enumerate(grads.ids):
            slope = secant_slopes[i] if i < len(secant_slopes) else np.nan
            writer.writerow([sample_id, f"{grads.norms[i]:.8g}", f"{grads.shift_norms[i]:.8g}",
                             f"{slope:.8g}" if np.isfinite(slope) else "", f"{grads.scores[i]:.8g}",
                             int(grads.n_scored[i]), int(grads.lengths[i])])
