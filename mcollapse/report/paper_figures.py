"""The paper's two summary figures drawn from run dirs: probe trajectories (Fig. 1) and mode
alignment profiles (Fig. 2), one panel per model (× dataset for Fig. 2)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mcollapse.report.paper_tables import HOOKS, mode_profile  # noqa: E402
from mcollapse.report.runs import RunSet  # noqa: E402


def _grid(n: int, width: float = 4.6, height: float = 3.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _nan_if_none(value):
    """A spread over one split is None; matplotlib draws no bar for NaN but refuses None."""
    return float("nan") if value is None else value


def probe_trajectories(groups: list[dict], path: Path) -> bool:
    """Fig. 1: modal probe accuracy across the four hooks, a line per dataset x info type, per model.
    Rows of other probe presets / poolings get their own panels. Returns False when there is nothing."""
    modal = [g for g in groups if g["input"] == "modal"]
    panels = sorted({(g["model"], g["probe"], g["pooling"]) for g in modal}, key=lambda k: (k[0], str(k[1:])))
    if not panels:
        return False
    several = len({(p, q) for _, p, q in panels}) > 1
    fig, axes = _grid(len(panels))
    for ax, (model, probe, pooling) in zip(axes, panels):
        lines = [g for g in modal if (g["model"], g["probe"], g["pooling"]) == (model, probe, pooling)]
        for g in sorted(lines, key=lambda g: (g["dataset"], g["info_type"])):
            xs = [i for i, h in enumerate(HOOKS) if g[h] is not None]
            label = g["info_type"] if len({x["dataset"] for x in lines}) == 1 else f"{g['info_type']} ({g['dataset']})"
            ax.errorbar(xs, [g[HOOKS[i]] for i in xs], yerr=[_nan_if_none(g[f"{HOOKS[i]}_std"]) for i in xs],
                        marker="o", capsize=2, linewidth=1.2, label=label)
        ax.set_xticks(range(len(HOOKS)))
        ax.set_xticklabels(["encoder", "adapter", "LLM layer", "LLM final"], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(model + (f"  [{probe}, {pooling}]" if several else ""), fontsize=10)
        ax.set_ylabel("probe accuracy")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Probe accuracy along the path to the decoder (mean ± std over splits)", fontsize=11, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mode_alignment_grid(runs: RunSet, path: Path, max_modes: int = 100) -> bool:
    """Fig. 2: rho_k per mode (bars, MS in red) and lambda_k on a log axis, per model x dataset."""
    panels = [(run, mode_profile(run)) for run in sorted(runs.of("modes"), key=lambda r: (r.model, r.dataset))]
    panels = [(run, profile[:max_modes]) for run, profile in panels if profile]
    if not panels:
        return False
    fig, axes = _grid(len(panels), width=5.0)
    for ax, (run, profile) in zip(axes, panels):
        ks = [int(m["mode"]) for m in profile]
        rho = [m["rho"] for m in profile]
        colors = ["tab:red" if m["label"] == "MS" else "tab:blue" for m in profile]
        ax.bar(ks, rho, color=colors, width=0.9)
        ax.set_yscale("symlog", linthresh=0.1)
        threshold = run.summary.get("ms_threshold", 0.5)
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("mode k (by decreasing eigenvalue)")
        ax.set_ylabel("ρ_k (text / modal variance)")
        twin = ax.twinx()
        twin.plot(ks, [m["eigenvalue"] for m in profile], color="tab:orange", linewidth=1.2)
        twin.set_yscale("log")
        twin.set_ylabel("λ_k", color="tab:orange")
        n_ms = sum(m["label"] == "MS" for m in profile)
        ax.set_title(f"{run.model} × {run.dataset}\nmode 0: {100 * profile[0]['explained_variance_ratio']:.1f} % "
                     f"of variance, {n_ms} MS of {len(profile)}", fontsize=9)
    fig.suptitle("Mode alignment (red: modality-specific, ρ < threshold; dashed: threshold)", fontsize=11, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
