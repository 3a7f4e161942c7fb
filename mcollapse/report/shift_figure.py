"""The representation-shift figure: cosine, L2 and CKA per layer, with the SAE's site marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def shift_figure(per_layer: list[dict], path: Path, title: str, sae_index: int | None = None) -> None:
    layers = [row["layer"] for row in per_layer]

    def series(key):
        return [row.get(key, float("nan")) for row in per_layer]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(layers, series("cosine_of_means"), marker="o", label="cos(mean a, mean b)")
    axes[0].plot(layers, series("mean_token_cosine"), marker=".", label="mean per-token cos")
    axes[0].set_ylabel("cosine")
    axes[1].plot(layers, series("l2_of_means"), marker="o", label="||mean a - mean b||")
    axes[1].plot(layers, series("mean_token_l2"), marker=".", label="mean per-token L2")
    axes[1].plot(layers, series("norm_of_mean_a"), linestyle=":", label="||mean a|| (scale)")
    axes[1].set_ylabel("L2")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[2].plot(layers, series("cka_tokens"), marker="o", label="linear CKA over tokens")
    axes[2].plot(layers, series("cka_items"), marker=".", label="linear CKA over items")
    axes[2].set_ylabel("CKA")
    for ax in axes:
        ax.set_xlabel("hidden_states index (0: LLM input, l: output of block l)")
        if sae_index is not None:
            ax.axvline(sae_index, color="grey", linestyle="--", linewidth=0.8, label=f"SAE site (index {sae_index})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
