"""Mode alignment (paper §5.3, Table 11, Fig. 2): which directions of the modal input text never varies along.

Modes: top eigenvectors of the covariance of pooled adapter outputs. rho_k compares the text
variance along u_k with the modal one, the text taken in the same space: the LLM's own token
embeddings of the transcripts/captions (where the adapter output is fed). MS: rho < threshold.
The eigenbasis and its labels are saved as an artifact (`eigenbasis.npz`) for gradproj, ablation
and msswap; the same file is cached per model x dataset x setting.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mcollapse.pipeline.decoder_side import decoder_inputs, shared_modes
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.report.decoder_figures import mode_alignment_figure, print_metrics

SHOWN = ["n_modes", "n_ms", "n_ta", "rho_0", "mean_rho_top10", "rho_normalised_0", "mean_rho_normalised_top10",
         "trace_ratio", "ms_variance_share", "ms_share_of_total", "top_modes_share_of_total"]


def run(cfg, run_dir: Path) -> dict:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    found = shared_modes(cfg, inputs, rec)
    basis, alignment = found.basis, found.alignment
    summary = {
        "n_modes": int(alignment.rho.size), "n_ms": alignment.n_ms, "n_ta": alignment.n_ta,
        "rho_0": alignment.rho_0, "mean_rho_top10": alignment.mean_rho_top10,
        "rho_normalised_0": float(alignment.rho_normalised[0]),
        "mean_rho_normalised_top10": float(alignment.rho_normalised[:10].mean()),
        "trace_ratio": alignment.trace_ratio, "rho_normalization": alignment.rho_normalization,
        "empty_classes": alignment.empty_classes,
        "ms_variance_share": alignment.ms_variance_share, "ms_share_of_total": alignment.ms_share_of_total,
        "top_modes_share_of_total": float(basis.eigenvalues.sum() / basis.total_variance),
        "ms_threshold": alignment.ms_threshold, "n_modal": basis.n_samples, "n_text": alignment.n_text,
        "dim": basis.dim, "space": "adapter_output (LLM input embeddings)",
        "n_ms_by_threshold": {str(t): n for t, n in alignment.sensitivity.items()},
        "ms_variance_share_by_threshold": {str(t): v for t, v in alignment.sensitivity_variance_share.items()},
    }
    artifact = run_dir / "eigenbasis.npz"
    shutil.copyfile(found.path, artifact)
    summary["eigenbasis"] = str(artifact)
    rows = [rec.row("adapter_output", "-", cfg.seed, name, summary[name]) for name in SHOWN]
    rows += [rec.row("adapter_output", "-", cfg.seed, "n_ms", n, threshold=t)
             for t, n in alignment.sensitivity.items()]
    per_mode = {"rho": alignment.rho.tolist(), "rho_normalised": alignment.rho_normalised.tolist(),
                "eigenvalue": basis.eigenvalues.tolist(),
                "explained_variance_ratio": basis.explained_variance_ratio.tolist(),
                "label": alignment.labels.tolist()}
    with rec.stage("report"):
        mode_alignment_figure(alignment.deciding_rho, basis.eigenvalues, alignment.is_ms, alignment.ms_threshold,
                              basis.explained_variance_ratio, run_dir / "mode_alignment.png",
                              f"{cfg.model.name} x {cfg.dataset.name}: mode alignment at the adapter output",
                              normalised=alignment.rho_normalization == "trace")
        with (run_dir / "modes.csv").open("w") as handle:
            handle.write("mode,eigenvalue,explained_variance_ratio,rho,rho_normalised,label\n")
            for k in range(alignment.rho.size):
                handle.write(f"{k},{basis.eigenvalues[k]:.8g},{basis.explained_variance_ratio[k]:.8g},"
                             f"{alignment.rho[k]:.8g},{alignment.rho_normalised[k]:.8g},{alignment.labels[k]}\n")
    rec.write(rows, summary, {"modes": per_mode})
    print_metrics(f"mode alignment: {cfg.model.name} x {cfg.dataset.name}", summary, SHOWN)
    deciding = "rho_normalised" if alignment.rho_normalization == "trace" else "rho"
    print_metrics("#MS modes by threshold", {f"{deciding} < {t:g}": n for t, n in alignment.sensitivity.items()})
    return summary
