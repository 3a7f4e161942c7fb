"""Figures and the Table-3-shaped summary of the LoRA experiment."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

FINAL_HOOK = "llm_final"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion_figure(task: dict, path: Path, title: str) -> None:
    """Row-normalised confusion matrices of the strictly parsed answers, base and LoRA side by side
    (the last column counts answers that did not parse)."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.6))
    for ax, condition in zip(axes, ("base", "lora")):
        confusion = task[condition]["confusion"]
        counts = np.array(confusion["counts"], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(confusion["rows"])), confusion["rows"], fontsize=8)
        ax.set_xlabel("answer (strict JSON)")
        ax.set_ylabel("true")
        ax.set_title(f"{condition}: accuracy {task[condition]['accuracy']:.3f} (n={task[condition]['n']})",
                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def training_figure(history: list[dict], best: int, path: Path, title: str, x: str = "epoch",
                    held_out: str = "val") -> None:
    """Train and held-out loss per `x` (epoch or step), held-out token accuracy on a second axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    trained = [h for h in history if h.get("train_loss") is not None]
    ax.plot([h[x] for h in trained], [h["train_loss"] for h in trained], marker="o", label="train loss")
    ax.plot([h[x] for h in history], [h[f"{held_out}_loss"] for h in history], marker="o",
            label=f"{'validation' if held_out == 'val' else held_out} loss")
    if best:
        ax.axvline(best, color="black", linestyle=":", linewidth=1, label=f"best {x} {best}")
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy per answer token")
    twin = ax.twinx()
    twin.plot([h[x] for h in history], [h[f"{held_out}_token_accuracy"] for h in history], color="#55a868",
              linestyle="--", label=f"{'validation' if held_out == 'val' else held_out} token accuracy")
    twin.set_ylim(0, 1)
    twin.set_ylabel("token accuracy")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def probe_change_figure(changes: dict, path: Path, title: str, hook: str = FINAL_HOOK) -> None:
    """Probe accuracy at one hook per info type, base vs LoRA, with chance marked."""
    info_types = [t for t in changes if hook in changes[t]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(info_types) + 2), 4.0))
    x = np.arange(len(info_types))
    for offset, condition, color in ((-0.2, "base", "#8c8c8c"), (0.2, "lora", "#c44e52")):
        values = [changes[t][hook][condition] for t in info_types]
        errors = [changes[t][hook][f"{condition}_std"] for t in info_types]
        ax.bar(x + offset, values, width=0.38, yerr=errors, capsize=3, color=color, label=condition)
    for i, t in enumerate(info_types):
        ax.hlines(changes[t][hook]["chance"], i - 0.4, i + 0.4, colors="black", linestyles=":", linewidth=1)
    ax.set_xticks(x, [f"{t}{' (targeted)' if changes[t][hook]['targeted'] else ''}" for t in info_types],
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"probe accuracy at {hook} (test split)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def print_lora_table(summary: dict, title: str, hook: str = FINAL_HOOK) -> None:
    """The paper's Table 3: probes at the final norm per info type, and task accuracy, base vs LoRA."""
    changes = summary["probe_changes"]
    info_types = sorted((t for t in changes if hook in changes[t]), key=lambda t: not changes[t][hook]["targeted"])
    table = Table(title=title)
    table.add_column("condition")
    for t in info_types:
        table.add_column(f"{t} probe{' *' if changes[t][hook]['targeted'] else ''}", justify="right")
    for name in ("task acc", "lenient", "likelihood"):
        table.add_column(name, justify="right")
    task = summary["task"]
    for condition in ("base", "lora"):
        cells = [f"{changes[t][hook][condition]:.3f}" for t in info_types]
        cells += [f"{task[condition][m]:.1%}" for m in ("accuracy", "lenient_accuracy", "likelihood_accuracy")]
        table.add_row(condition, *cells)
    deltas = [f"{changes[t][hook]['delta']:+.3f}" for t in info_types]
    deltas += [f"{task['lora'][m] - task['base'][m]:+.1%}" for m in ("accuracy", "lenient_accuracy",
                                                                    "likelihood_accuracy")]
    table.add_row("delta", *deltas)
    Console(width=140).print(table)
