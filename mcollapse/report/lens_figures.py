"""Figures of the layer-wise lenses: similarity, IMA curves, logit lens, embedding maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ima_figure(curves: dict, path: Path, title: str) -> None:
    """IMA(l) per model/checkpoint, one line each (all-pairs solid, matched dashed), score in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (name, by_pairing) in enumerate(curves.items()):
        colour = f"C{n % 10}"
        for pairing, value in by_pairing.items():
            style = "-" if pairing == "all" else "--"
            ax.plot(value["curve"], style, color=colour, label=f"{name} {pairing} (IMA {value['score']:.3f})")
    ax.set_xlabel("layer l (0 = LLM input)")
    ax.set_ylabel("cos(P at layer 0, T at layer l)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


def similarity_figure(rows: list[dict], path: Path, title: str) -> None:
    """P-T, P-P, T-T, intra and noise cosines (pooled vectors) over layers, one panel per pairing;
    then the token reductions of P-T; then consecutive-layer cosines."""
    def series(family, pairing, pooling, metric="cos_mean"):
        picked = sorted((r["layer"], r["value"]) for r in rows if r["info_type"] == family
                        and r.get("pairing") == pairing and r.get("pooling") == pooling and r["metric"] == metric)
        return [p[0] for p in picked], [p[1] for p in picked]

    families = sorted({r["info_type"] for r in rows if r.get("pairing")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for family in [f for f in families if not f.startswith("step")]:
        for pairing, style in (("all", "-"), ("matched", "--")):
            x, y = series(family, pairing, "pooled")
            if x:
                axes[0].plot(x, y, style, label=f"{family} {pairing}")
    axes[0].set_title("pooled vectors")
    for pooling in ("mean", "median", "max", "min"):
        for pairing, style in (("all", "-"), ("matched", "--")):
            x, y = series("P-T", pairing, pooling)
            if x:
                axes[1].plot(x, y, style, label=f"P-T {pooling} {pairing}")
    axes[1].set_title("P-T, token x token cosines")
    for family in [f for f in families if f.startswith("step")]:
        x, y = series(family, "matched", "pooled")
        if x:
            axes[2].plot(x, y, label=family)
    axes[2].set_title("layer l vs l + k (same item)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    _save(fig, path)


def lens_figure(per_layer: dict, path: Path, title: str) -> None:
    """Entropy per layer (P, T) and KL curves: per_layer[name] = list over layers."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, values in per_layer.items():
        ax = axes[0] if name.startswith("entropy") else axes[1]
        ax.plot(range(len(values)), values, label=name)
    axes[0].set_title("entropy (nats)")
    axes[1].set_title("KL (nats)")
    for ax in axes:
        ax.set_xlabel("layer")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def top_tokens_figure(tables: dict, path: Path, title: str) -> None:
    """tables[(side, layer)] = [(text, count), ...]: one horizontal bar chart per side x layer."""
    keys = sorted(tables)
    sides = sorted({k[0] for k in keys})
    layers = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(sides), len(layers), figsize=(3.2 * len(layers), 3 * len(sides)), squeeze=False)
    for i, side in enumerate(sides):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            items = tables.get((side, layer), [])
            ax.barh(range(len(items)), [c for _, c in items])
            ax.set_yticks(range(len(items)))
            ax.set_yticklabels([repr(t)[1:-1][:14] for t, _ in items], fontsize=6)
            ax.invert_yaxis()
            ax.set_title(f"{side} layer {layer}", fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def map_grid(panels: list[list[dict]], path: Path, title: str) -> None:
    """panels[row][col] = {title, x, y, groups (labels per point) or kde: {group: values}}."""
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.4 * n_cols, 3.1 * n_rows), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            panel = row[j]
            if "kde" in panel:
                for n, (group, values) in enumerate(panel["kde"].items()):
                    _kde(ax, np.asarray(values), f"C{n % 10}", str(group))
            else:
                groups = np.asarray(panel["groups"], dtype=object)
                for n, group in enumerate(sorted(set(groups.tolist()), key=str)):
                    keep = groups == group
                    ax.scatter(np.asarray(panel["x"])[keep], np.asarray(panel["y"])[keep], s=6, color=f"C{n % 10}",
                               label=str(group))
            ax.set_title(panel["title"], fontsize=8)
            if ax.get_legend_handles_labels()[0] and len(ax.get_legend_handles_labels()[0]) <= 12:
                ax.legend(fontsize=5, markerscale=1.5)
    fig.suptitle(title)
    _save(fig, path)


def _kde(ax, values: np.ndarray, colour: str, label: str) -> None:
    if values.size < 2 or np.ptp(values) == 0:
        ax.axvline(values.mean() if values.size else 0.0, color=colour, label=label)
        return
    from scipy.stats import gaussian_kde

    grid = np.linspace(values.min() - np.ptp(values) * 0.2, values.max() + np.ptp(values) * 0.2, 200)
    ax.plot(grid, gaussian_kde(values)(grid), color=colour, label=label)
