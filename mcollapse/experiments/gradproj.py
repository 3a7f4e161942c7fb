"""Gradient isotropy (paper §5.3): does the decoder's score respond less along MS modes than TA modes?

Each sample's gradient w.r.t. the adapter-output sequence is projected on the modes at every
position; g_k is its magnitude sqrt(sum_t <g_t, u_k>^2) averaged over samples (the reference's
|<mean_t g_t, u_k>| is reported beside it). An isotropic decoder gives g_TA / g_MS ~ 1 and no rank
correlation between rho_k and g_k. Shares the gradient pass with lipschitz when the samples match.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mcollapse.analysis.modes import gradient_isotropy
from mcollapse.errors import UserError
from mcollapse.pipeline.decoder_side import decoder_inputs, gradient_batch_size, gradients, scored_ids, shared_modes
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.report.decoder_figures import gradproj_figure, print_metrics

log = logging.getLogger(__name__)

SHOWN = ["n_samples", "n_ms", "n_ta", "g_ta", "g_ms", "g_ta_over_g_ms", "spearman_r", "spearman_p",
         "reference_g_ta_over_g_ms", "reference_spearman_r", "reference_spearman_p"]


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    mode_set = shared_modes(cfg, inputs, rec)
    if mode_set.alignment.n_ms == 0 or mode_set.alignment.n_ta == 0:
        log.warning("all %d modes are %s: g_TA / g_MS is undefined", mode_set.alignment.rho.size,
                    "TA" if mode_set.alignment.n_ms == 0 else "MS")
    ids = scored_ids(inputs, target.name, cfg.gradients.n_samples, rec)
    grads = gradients(inputs, rec, ids, target, gradient_batch_size(cfg), mode_set)
    if grads.mode_magnitudes is None:
        raise UserError("gradient pass holds no mode projections")
    with rec.stage("statistics"):
        iso = gradient_isotropy(grads.mode_magnitudes, mode_set.alignment, exp.statistic)
        ref = gradient_isotropy(grads.mean_grad_magnitudes, mode_set.alignment, exp.statistic)
    summary = {**iso.summary(), "statistic": iso.statistic, "target": target.name, "reduction": target.reduction,
               "reference_g_ta_over_g_ms": ref.ratio, "reference_spearman_r": ref.spearman_r,
               "reference_spearman_p": ref.spearman_p, "eigenbasis": str(mode_set.path),
               "rho_normalization": mode_set.alignment.rho_normalization,
               "empty_classes": mode_set.alignment.empty_classes}
    rows = [rec.row("adapter_output", "-", cfg.seed, name, summary[name], target=target.name)
            for name in SHOWN]
    with rec.stage("report"):
        gradproj_figure(iso.rho, iso.g_k, iso.g_k_std, iso.is_ms, summary, run_dir / "gradproj.png",
                        f"{cfg.model.name} x {cfg.dataset.name} (target={target.name})")
    per_mode = {"rho": iso.rho.tolist(), "g_k": iso.g_k.tolist(), "g_k_std": iso.g_k_std.tolist(),
                "reference_g_k": ref.g_k.tolist(), "label": mode_set.alignment.labels.tolist()}
    rec.write(rows, summary, {"modes": per_mode})
    print_metrics(f"gradient isotropy: {cfg.model.name} x {cfg.dataset.name}", summary, SHOWN)
    return summary
