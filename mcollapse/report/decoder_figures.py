"""Figures and tables of the decoder-side experiments: L_log, mode alignment, isotropy, GMI."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_metrics(title: str, metrics: dict, keys: list[str] | None = None) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys or list(metrics):
        value = metrics.get(key)
        if value is None:
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, text)
    Console(width=120).print(table)


def lipschitz_histogram(norms: np.ndarray, stats: dict, path: Path, title: str, bins: int = 40) -> None:
    """Distribution of per-sample ||grad_z log q||, with mean, median and p95 marked."""
    finite = norms[np.isfinite(norms)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(finite, bins=bins, color="#4c72b0", alpha=0.85)
    for name, style in (("mean", "-"), ("median", "--"), ("p95", ":")):
        ax.axvline(stats[name], color="black", linestyle=style, linewidth=1.2, label=f"{name} = {stats[name]:.4g}")
    ax.set_xlabel(r"$\|\nabla_z \log q(y\,|\,z, c)\|_F$ per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"{title}\nn = {finite.size}, max = {stats['max']:.4g}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def mode_alignment_figure(rho: np.ndarray, eigenvalues: np.ndarray, is_ms: np.ndarray, threshold: float,
                          explained: np.ndarray, path: Path, title: str, normalised: bool = False) -> None:
    """The paper's Fig. 2: rho_k bars (MS in red) and lambda_k on a log axis; `normalised`: the bars
    are the trace-normalised rho that decided the split."""
    k = np.arange(rho.size)
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    ax.bar(k, rho, color=np.where(is_ms, "#c44e52", "#4c72b0"), width=0.85)
    ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"MS threshold {threshold:g}")
    ax.set_xlabel("mode k (by decreasing modal variance)")
    ax.set_ylabel(r"$\rho_k \,\mathrm{tr}\Sigma_M / \mathrm{tr}\Sigma_T$" if normalised
                  else r"$\rho_k = u_k^\top \Sigma_T u_k / \lambda_k$")
    ax.set_yscale("symlog", linthresh=1.0)
    twin = ax.twinx()
    twin.plot(k, eigenvalues, color="#55a868", linewidth=1.5, label=r"$\lambda_k$")
    twin.set_yscale("log")
    twin.set_ylabel(r"$\lambda_k$ (modal variance)")
    ax.set_title(f"{title}\nMS modes: {int(is_ms.sum())}/{rho.size}; mode 0 holds {explained[0]:.1%} of the "
                 f"modal variance; rho_0 = {rho[0]:.3g}", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    _save(fig, path)


def gradproj_figure(rho: np.ndarray, g_k: np.ndarray, g_std: np.ndarray, is_ms: np.ndarray, summary: dict,
                    path: Path, title: str) -> None:
    """g_k against rho_k per mode: an isotropic decoder shows no trend."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mask, color, name in ((is_ms, "#c44e52", "MS"), (~is_ms, "#4c72b0", "TA")):
        if mask.any():
            ax.errorbar(rho[mask], g_k[mask], yerr=g_std[mask] / np.sqrt(max(summary["n_samples"], 1)),
                        fmt="o", ms=4, color=color, alpha=0.8, label=f"{name} ({int(mask.sum())})")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel(r"$\rho_k$ (text / modal variance along mode k)")
    ax.set_ylabel(r"$g_k$ (mean gradient magnitude along mode k)")
    ax.set_title(f"{title}\n" + f"g_TA/g_MS = {summary['g_ta_over_g_ms']:.3g}; Spearman r = "
                 f"{summary['spearman_r']:.3f} (p = {summary['spearman_p']:.3g})", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def gmi_figure(results: dict, probe_info: dict, path: Path, title: str) -> None:
    """GMI for modal and text input with CIs, the cap log(m+1) and the probe's information."""
    names = [n for n in ("modal", "text") if n in results]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for x, name in enumerate(names):
        r = results[name]
        ax.errorbar([x], [r["gmi"]], yerr=[[r["gmi"] - r["ci_low"]], [r["ci_high"] - r["gmi"]]], fmt="o",
                    capsize=5, color="#4c72b0", label="GMI (decoder)" if x == 0 else None)
        if name in probe_info and probe_info[name] is not None:
            ax.plot([x + 0.15], [probe_info[name]], "s", color="#dd8452",
                    label="probe information H(Y) - CE" if x == 0 else None)
    cap = results[names[0]].get("cap")
    if cap is not None and np.isfinite(cap):
        ax.axhline(cap, color="black", linestyle=":", linewidth=1, label=f"cap log(m+1) = {cap:.3g}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), [f"{n} input" for n in names])
    ax.set_ylabel("nats")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def ablation_figure(results: list[dict], path: Path, title: str) -> None:
    """Loss change as a fraction of the swap reference per condition, with cluster-bootstrap 95 %
    intervals, one colour per variant; 1 (dashed) is all the sample-specific use of the input."""
    rows = [r for r in results if r.get("class") != "reference" and "frac_of_swap" in r]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    names = list(dict.fromkeys(r["condition"] for r in rows))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3.5, 4.4))
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
    for v, variant in enumerate(variants):
        by = {r["condition"]: r for r in rows if r["variant"] == variant}
        xs = [i + (v - (len(variants) - 1) / 2) * width for i, n in enumerate(names) if n in by]
        swap = [by[n]["delta_swap_same_samples"] for n in names if n in by]
        ys = [by[n]["frac_of_swap"] for n in names if n in by]
        present = [n for n in names if n in by]
        low = [max(y - by[n]["delta_cluster_ci_low"] / s, 0) if s else 0 for y, n, s in zip(ys, present, swap)]
        high = [max(by[n]["delta_cluster_ci_high"] / s - y, 0) if s else 0 for y, n, s in zip(ys, present, swap)]
        ax.bar(xs, ys, width=width * 0.95, color=colors[v % len(colors)], label=variant, yerr=[low, high], capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(1, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30,
                  ha="right")
    ax.set_ylabel("Δ loss / Δ swap")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def dose_response_figure(points: list[dict], results: list[dict], curves: dict, path: Path, title: str) -> None:
    """Δ loss against the dose (variance removed) for random mode subsets, with the fitted curve, per
    dose variant; the treatments and references marked."""
    variants = list(curves) or list(dict.fromkeys(p["variant"] for p in points))
    fig, axes = plt.subplots(1, max(len(variants), 1), figsize=(5.2 * max(len(variants), 1), 4.2), squeeze=False)
    markers = {"MS": ("#c44e52", "o"), "TA": ("#4c72b0", "s"), "random": ("#55a868", "^"),
               "random_matched": ("#8172b3", "v")}
    for ax, variant in zip(axes[0], variants):
        dose_key = "dose_token" if curves.get(variant, {}).get("dose", "token") == "token" else "dose_pooled"
        mine = [p for p in points if p["variant"] == variant]
        ax.scatter([p[dose_key] for p in mine], [p["delta_loss"] for p in mine], s=14, color="0.6",
                   label="random mode subsets")
        if variant in curves:
            a, b = curves[variant]["coef"]
            grid = np.linspace(0, 1, 101)
            ax.plot(grid, a * grid + b * grid ** 2, color="0.3", linewidth=1, label="fit a·v + b·v²")
        share_key = "variance_share_removed_token" if dose_key == "dose_token" else "variance_share_removed"
        for r in results:
            if r["variant"] != variant or r.get("class") not in markers or "delta_loss" not in r:
                continue
            color, marker = markers[r["class"]]
            ax.scatter([r[share_key]], [r["delta_loss"]], color=color, marker=marker, s=40, zorder=3)
            ax.annotate(r["condition"], (r[share_key], r["delta_loss"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        swap = next((r for r in results if r["condition"] == "swap" and "delta_loss" in r), None)
        if swap:
            ax.axhline(swap["delta_loss"], color="black", linestyle="--", linewidth=0.8, label="swap")
        ax.set_xlabel("variance removed (" + ("per token" if dose_key == "dose_token" else "pooled") + ")")
        ax.set_ylabel("Δ loss (nats)")
        ax.set_title(f"{variant}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def print_ablation_table(results: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("variant", "condition", "modes", "var. pooled", "var. token", "ΔLoss", "cluster 95% CI",
                   "Δ/Δswap", "beyond dose", "t", "p", "n"):
        table.add_column(column, justify="right")
    for r in results:
        if "delta_loss" not in r:
            table.add_row(r["variant"], r["condition"], *[""] * 9, str(r.get("n", 0)))
            continue
        beyond = f"{r['class_effect']:+.3g} [{r['class_effect_ci_low']:+.3g}, {r['class_effect_ci_high']:+.3g}]" \
            if "class_effect" in r else ""
        table.add_row(r["variant"], r["condition"], str(r.get("n_modes_removed", "")),
                      f"{r['variance_share_removed']:.1%}" if "variance_share_removed" in r else "",
                      f"{r['variance_share_removed_token']:.1%}" if "variance_share_removed_token" in r else "",
                      f"{r['delta_loss']:+.4g}",
                      f"[{r['delta_cluster_ci_low']:+.3g}, {r['delta_cluster_ci_high']:+.3g}]",
                      f"{r['frac_of_swap']:.3g}", beyond, f"{r['t']:.2f}", f"{r['p']:.3g}", str(r["n"]))
    Console(width=170).print(table)


def msswap_figure(data: dict, path: Path, title: str) -> None:
    """Per sample and draw: KL against the size of the shift, MS and TA swaps."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for subspace, color in (("MS", "#c44e52"), ("TA", "#4c72b0")):
        shift, kl = data[f"shift_{subspace}"].ravel(), data[f"kl_{subspace}"].ravel()
        ax.scatter(shift, kl, s=10, alpha=0.6, color=color,
                   label=f"{subspace} swap: mean KL {kl.mean():.3g} nats/position")
    ax.set_xlabel("shift size ||P (mu_B - zbar)||")
    ax.set_ylabel(r"KL($p_{base}$ || $p_{swap}$) per answer position (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
