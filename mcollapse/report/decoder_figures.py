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
    """Loss change in % of the baseline per condition, 95% CIs, one colour per variant."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    names = list(dict.fromkeys(r["condition"] for r in results))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3.0, 4.2))
    colors = ("#4c72b0", "#dd8452", "#55a868")
    for v, variant in enumerate(variants):
        rows = {r["condition"]: r for r in results if r["variant"] == variant}
        xs = [i + (v - (len(variants) - 1) / 2) * width for i, n in enumerate(names) if n in rows]
        ys = [rows[n]["delta_pct"] for n in names if n in rows]
        low = [rows[n]["delta_pct"] - rows[n]["delta_pct_ci_low"] for n in names if n in rows]
        high = [rows[n]["delta_pct_ci_high"] - rows[n]["delta_pct"] for n in names if n in rows]
        ax.bar(xs, ys, width=width * 0.95, color=colors[v % len(colors)], label=variant, yerr=[low, high], capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    labels = []
    for n in names:
        first = next(r for r in results if r["condition"] == n)
        labels.append(f"{n}\n({first['n_modes_removed']} modes)")
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel("loss change vs no ablation (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def print_ablation_table(results: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("variant", "condition", "modes", "var. removed", "ΔLoss", "ΔLoss %", "95% CI (%)", "t", "p", "n"):
        table.add_column(column, justify="right")
    for r in results:
        spread = f" ±{r['draw_delta_pct_std']:.2f}" if "draw_delta_pct_std" in r else ""
        table.add_row(r["variant"], r["condition"], str(r["n_modes_removed"]), f"{r['variance_share_removed']:.1%}",
                      f"{r['delta_loss']:.4g}", f"{r['delta_pct']:+.2f}{spread}",
                      f"[{r['delta_pct_ci_low']:+.2f}, {r['delta_pct_ci_high']:+.2f}]", f"{r['t']:.2f}",
                      f"{r['p']:.3g}", str(r["n"]))
    Console(width=140).print(table)


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
