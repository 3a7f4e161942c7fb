"""Figures of the skip and weight_overlap experiments."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MARKERS = {"block": "o", "ffn": "s", "parallel": "^", "exit": "X"}
_COLOURS = {"modality": "tab:blue", "all": "tab:red", "decode": "tab:green"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def skip_figure(results: list[dict], path: Path, title: str) -> None:
    """Loss change (with its 95 % CI) and greedy token agreement against the share of LLM FLOPs
    skipped, one point per condition: marker = operation, colour = gating."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        x = 100 * r["flops_skipped_fraction"]
        style = {"marker": _MARKERS.get(r["operation"], "o"), "color": _COLOURS.get(r["gating"], "k")}
        axes[0].errorbar([x], [r["delta_loss"]], yerr=[[r["delta_loss"] - r["delta_ci_low"]],
                                                        [r["delta_ci_high"] - r["delta_loss"]]],
                         linestyle="none", capsize=3, **style)
        axes[1].plot([x], [r["token_agreement"]], linestyle="none", **style)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(xlabel="LLM FLOPs skipped (%)", ylabel="content loss change (nats)", title="loss change")
    axes[1].set(xlabel="LLM FLOPs skipped (%)", ylabel="token agreement with unskipped greedy",
                title="greedy agreement", ylim=(-0.02, 1.02))
    handles = [plt.Line2D([], [], marker=m, color="k", linestyle="none", label=op) for op, m in _MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", color=c, linestyle="none", label=g) for g, c in _COLOURS.items()]
    axes[1].legend(handles=handles, fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def overlap_figure(iou: dict, path: Path, title: str) -> None:
    """IoU of the P and T masks per layer (rows) and module (columns), one heatmap per sparsity.
    `iou`: {sparsity: (layers x modules array, module names)}."""
    fig, axes = plt.subplots(1, len(iou), figsize=(max(6.5, 4.2 * len(iou)), 5), squeeze=False)
    for ax, (s, (grid, modules)) in zip(axes[0], iou.items()):
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        expected = (1 - s) / (1 + s)
        ax.set(xticks=range(len(modules)), xticklabels=modules, xlabel="module", ylabel="LLM block",
               title=f"s={s:g}: mean IoU {np.nanmean(grid):.3f} (chance {expected:.3f})")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
