"""L_log: how fast the decoder's log-score moves with the representation it is fed (Assumption 2).

Per sample, ||grad_z log q(y | z, c)||_F with z the whole adapter-output sequence (the LLM's input
at the modality positions), from one LLM-only backward per batch. D and D_eff (§A.3) are measured
on the pooled adapter outputs (D_S also over the union with the pooled text embeddings); note that
L is a norm over the unpooled sequence, so L x D mixes two spaces exactly as the paper does.
The per-sample gradients' magnitudes along the modes are kept for gradproj.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from mcollapse.analysis.lipschitz import diameter, gradient_norm_histogram, lipschitz_summary
from mcollapse.experiments.common import recorder, selected_records
from mcollapse.experiments.llm_side import (
    batch_size_of,
    decoder_inputs,
    gradients,
    lipschitz_summary_path,
    modes,
    scored_ids,
    write_json,
)
from mcollapse.report.decoder_figures import lipschitz_histogram, print_metrics

log = logging.getLogger(__name__)

SHOWN = ["n_samples", "L_mean", "L_median", "L_p95", "L_max", "D", "D_eff", "participation_ratio", "D_S",
         "L_mean_x_D", "L_p95_x_D", "L_mean_x_D_eff", "L_p95_x_D_eff", "mean_scored_tokens"]


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    ids = scored_ids(inputs, target.name, exp.n_samples, rec)
    mode_set = None
    if len(inputs.with_text()) >= 3:
        mode_set = modes(inputs, rec, int(exp.n_modes), float(exp.ms_threshold),
                         rho_normalization=str(exp.rho_normalization))
    else:
        log.info("fewer than 3 texts: gradient projections on the modes are not stored")
    grads = gradients(inputs, rec, ids, target, batch_size_of(cfg), mode_set)

    with rec.stage("statistics"):
        pooled = inputs.sequences.pooled()
        summary = lipschitz_summary(grads.norms, pooled, robust_quantile=float(exp.robust_quantile),
                                    seed=int(cfg.seed))
        text_ids = inputs.with_text()
        if text_ids:
            text = np.stack([inputs.text_sequence(i).astype(np.float64).mean(axis=0) for i in text_ids])
            summary["D_S"] = diameter(np.vstack([pooled, text]))
        summary.update({"n_samples": len(ids), "n_pooled_for_D": len(pooled),
                        "mean_scored_tokens": float(grads.n_scored.mean()),
                        "mean_positions": float(grads.lengths.mean()), "mean_score": float(np.mean(grads.scores)),
                        "target": target.name, "reduction": target.reduction})
    rows = [rec.row("adapter_output", "-", int(cfg.seed), name, value, target=target.name,
                    reduction=target.reduction)
            for name, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    with rec.stage("report"):
        _per_sample_csv(run_dir / "per_sample.csv", grads)
        title = f"{cfg.model.name} x {cfg.dataset.name} (target={target.name}, {target.reduction})"
        stats = {k: summary[f"L_{k}"] for k in ("mean", "median", "p95", "max")}
        lipschitz_histogram(grads.norms, stats, run_dir / "lipschitz_hist.png", title, int(exp.histogram_bins))
    details = {"histogram": gradient_norm_histogram(grads.norms, int(exp.histogram_bins)),
               "modes_artifact": str(mode_set.path) if mode_set else None}
    rec.write(rows, summary, details)
    write_json(lipschitz_summary_path(inputs.cache_dir, cfg.model, inputs.dataset, target),
               {**summary, "run_dir": str(run_dir)})
    print_metrics(f"L_log: {cfg.model.name} x {cfg.dataset.name} (target={target.name})", summary, SHOWN)
    return summary


def _per_sample_csv(path: Path, grads) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "grad_norm", "log_score", "n_scored_tokens", "n_positions"])
        for i, sample_id in enumerate(grads.ids):
            writer.writerow([sample_id, f"{grads.norms[i]:.8g}", f"{grads.scores[i]:.8g}", int(grads.n_scored[i]),
                             int(grads.lengths[i])])
