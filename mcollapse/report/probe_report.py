"""The probe figure (accuracy across hooks per info type, the paper's Fig. 1 style) and table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def probe_figure(summary: dict, path: Path, title: str = "") -> None:
    hooks = summary["hooks"]
    probes = summary.get("probes", {})
    fig, ax = plt.subplots(figsize=(1.9 * len(hooks) + 4.0, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (info_type, per_hook) in enumerate(sorted(probes.get("modal", {}).items())):
        color = colors[i % len(colors)]
        xs = [j for j, h in enumerate(hooks) if h in per_hook]
        means = [per_hook[hooks[j]]["accuracy_mean"] for j in xs]
        stds = [per_hook[hooks[j]]["accuracy_std"] for j in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", color=color, capsize=3, label=info_type)
        chance = next(iter(per_hook.values()))["chance"]
        ax.axhline(chance, color=color, linestyle=":", linewidth=1)
        text_hooks = probes.get("text", {}).get(info_type, {})
        tx = [j for j, h in enumerate(hooks) if h in text_hooks]
        if tx:
            ax.plot(tx, [text_hooks[hooks[j]]["accuracy_mean"] for j in tx], marker="D", linestyle="--",
                    color=color, markerfacecolor="white", label=f"{info_type} (text input)")
    ax.set_xticks(range(len(hooks)))
    ax.set_xticklabels(hooks, rotation=15)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probe accuracy (mean ± std over splits)")
    ax.set_title(f"{title}\n(dotted: chance 1/K)" if title else "dotted: chance 1/K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_table(summary: dict, title: str = "") -> Table:
    hooks = summary["hooks"]
    table = Table(title=title)
    table.add_column("input")
    table.add_column("info type")
    table.add_column("K", justify="right")
    table.add_column("chance", justify="right")
    table.add_column("majority", justify="right")
    for hook in hooks:
        table.add_column(hook, justify="right")
    table.add_column("retention", justify="right")
    retention = summary.get("retention_adapter_to_final", {})
    for kind, per_type in summary.get("probes", {}).items():
        for info_type, per_hook in sorted(per_type.items()):
            first = next(iter(per_hook.values()))
            cells = [
                f"{per_hook[h]['accuracy_mean']:.3f}±{per_hook[h]['accuracy_std']:.3f}" if h in per_hook else "–"
                for h in hooks
            ]
            kept = retention.get(info_type) if kind == "modal" else None
            table.add_row(kind, info_type, str(first["n_classes"]), f"{first['chance']:.3f}",
                          f"{first['majority']:.3f}", *cells, "–" if kept is None else f"{kept:.2f}")
    return table


def print_probe_table(summary: dict, title: str = "") -> None:
    Console(width=160).print(probe_table(summary, title))
    for key, reason in summary.get("skipped", {}).items():
        Console().print(f"[yellow]skipped[/] {key}: {reason}")
