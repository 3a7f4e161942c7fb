"""The paper's tables assembled from run dirs, each row carrying its settings and its `source`.

Numbers are read from the runs' results, never recomputed from activations; the only arithmetic
here is what a table defines from them (retention, Δ_LLM, L·W1, percentages). A cell that would
need a missing run is left empty and said so in the table's `missing` list.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict

from mcollapse.analysis.probes import retention
from mcollapse.report.runs import Run, RunSet
from mcollapse.report.tables import Table

HOOKS = ("encoder_output", "adapter_output", "llm_layer", "llm_final")
TEXTUAL = ("lexical", "object_category", "super_category")  # named in captions (Table 10, top)
PAPER_EXPERIMENTS = ("extract", "probe", "lipschitz", "wasserstein", "modes", "gradproj", "gmi", "ablation", "msswap",
                     "lora")


def hook_column(hook: str) -> str:
    return "llm_layer" if hook.startswith("llm_layer") else hook


def _sources(runs: list[Run]) -> str:
    return ";".join(sorted({r.source for r in runs}))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1, as the probe runs report it) over splits."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _order(run: Run) -> tuple:
    return ({"audio": 0, "image": 1}.get(run.modality or "", 2), run.model, run.dataset)


# ---------------------------------------------------------------------------------------------
# Probes: Table 5 (accuracy per hook), Tables 6-7 (retention), Table 10 (Prismatic comparison)


def probe_groups(runs: RunSet) -> list[dict]:
    """Per model x dataset x input x info type x probe preset x pooling x layer: every split's
    accuracy at each hook, pooled over the runs that share those settings (e.g. several seeds)."""
    groups: dict[tuple, dict] = {}
    for run in sorted(runs.of("probe"), key=_order):
        for row in run.rows:
            if row.get("metric") != "accuracy":
                continue
            key = (run.model, run.dataset, row.get("input", "modal"), row["info_type"],
                   row.get("probe") or run.settings.get("probe"), row.get("pooling") or run.settings.get("pooling"),
                   run.settings.get("llm_layer"))
            group = groups.setdefault(key, {"runs": [], "acc": defaultdict(list), "chance": row.get("chance"),
                                            "n_classes": row.get("n_classes"), "family": run.family})
            if run not in group["runs"]:
                group["runs"].append(run)
            group["acc"][hook_column(row["hook"])].append(float(row["value"]))
    out = []
    for (model, dataset, kind, info_type, probe, pooling, layer), group in groups.items():
        entry = {"model": model, "dataset": dataset, "input": kind, "info_type": info_type, "probe": probe,
                 "pooling": pooling, "layer": layer, "n_classes": group["n_classes"], "chance": group["chance"],
                 "family": group["family"], "n_runs": len(group["runs"]), "source": _sources(group["runs"])}
        for hook in HOOKS:
            entry[hook], entry[f"{hook}_std"] = _mean_std(group["acc"].get(hook, []))
        entry["n_splits"] = max((len(v) for v in group["acc"].values()), default=0)
        out.append(entry)
    return out


def probe_table(groups: list[dict]) -> Table:
    columns = ["model", "dataset", "input", "info_type", "probe", "pooling", "layer", "n_classes", "chance",
               *[c for h in HOOKS for c in (h, f"{h}_std")], "n_splits", "n_runs", "source"]
    table = Table("table5_probes", "Probe accuracy per hook (Table 5)", columns, list(groups),
                  caption="Linear-probe accuracy, mean ± std over the splits of every run sharing the row's "
                          "settings (`probe` preset, `pooling`, LLM `layer`). `input`: modal = the model fed the "
                          "audio/images; text = its LLM fed the transcripts/captions. Chance = 1/K.",
                  pairs={h: f"{h}_std" for h in HOOKS}, digits={h: 3 for h in HOOKS} | {"chance": 3})
    if not groups:
        table.missing.append("no probe runs")
    return table


def retention_table(groups: list[dict]) -> Table:
    columns = ["model", "dataset", "info_type", "probe", "pooling", "chance", "adapter_output", "llm_final",
               "ratio_pct", "retained_pct", "source"]
    table = Table("table6_retention", "Retention, adapter output → LLM final norm (Tables 6–7)", columns,
                  caption="`ratio_pct` = 100 · final / adapter, the paper's Tables 6–7 (> 100: the LLM amplifies). "
                          "`retained_pct` = 100 · (final − chance) / (adapter − chance), the share of the adapter's "
                          "above-chance accuracy left at the final norm (empty when the adapter is at chance).",
                  digits={"adapter_output": 3, "llm_final": 3, "chance": 3, "ratio_pct": 1, "retained_pct": 1})
    for g in groups:
        if g["input"] != "modal":
            continue
        adapter, final, chance = g["adapter_output"], g["llm_final"], g["chance"]
        if adapter is None or final is None:
            table.missing.append(f"{g['model']} × {g['dataset']} {g['info_type']}: no "
                                 f"{'adapter_output' if adapter is None else 'llm_final'} probe")
            continue
        retained = retention(final, adapter, chance) if chance is not None else None
        table.rows.append({**{k: g[k] for k in ("model", "dataset", "info_type", "probe", "pooling", "chance",
                                                "source")},
                           "adapter_output": adapter, "llm_final": final,
                           "ratio_pct": 100 * final / adapter if adapter > 0 else None,
                           "retained_pct": 100 * retained if retained is not None else None})
    if not table.rows and not table.missing:
        table.missing.append("no probe runs with both adapter_output and llm_final")
    return table


def prismatic_table(groups: list[dict]) -> Table:
    columns = ["dataset", "kind", "info_type", "model", "probe", "pooling", "adapter_output", "llm_final",
               "delta_llm", "text_llm_final", "source"]
    table = Table("table10_prismatic", "Prismatic controlled comparison (Table 10)", columns,
                  caption="Prismatic models share architecture, projector recipe and LLM; only the vision encoder "
                          "differs. `delta_llm` = llm_final − adapter_output. `text_llm_final`: the same LLM fed the "
                          "captions. `kind`: textual attributes are named in captions, non-textual ones are derived "
                          "from the annotations.",
                  digits={c: 3 for c in ("adapter_output", "llm_final", "delta_llm", "text_llm_final")})
    prismatic = [g for g in groups if g["family"] == "prismatic"]
    text = {(g["model"], g["dataset"], g["info_type"], g["probe"], g["pooling"]): g for g in prismatic
            if g["input"] == "text"}
    by_dataset = defaultdict(set)
    for g in prismatic:
        by_dataset[g["dataset"]].add(g["model"])
    for dataset, models in sorted(by_dataset.items()):
        if len(models) < 2:
            table.missing.append(f"{dataset}: one Prismatic model ({', '.join(models)}); the comparison needs two")
    for g in sorted((g for g in prismatic if g["input"] == "modal" and len(by_dataset[g["dataset"]]) > 1),
                    key=lambda g: (g["dataset"], g["info_type"] not in TEXTUAL, g["info_type"], g["model"])):
        peer = text.get((g["model"], g["dataset"], g["info_type"], g["probe"], g["pooling"]))
        adapter, final = g["adapter_output"], g["llm_final"]
        table.rows.append({"dataset": g["dataset"], "kind": "textual" if g["info_type"] in TEXTUAL else "non-textual",
                           "info_type": g["info_type"], "model": g["model"], "probe": g["probe"],
                           "pooling": g["pooling"], "adapter_output": adapter, "llm_final": final,
                           "delta_llm": final - adapter if adapter is not None and final is not None else None,
                           "text_llm_final": peer["llm_final"] if peer else None,
                           "source": ";".join(sorted({g["source"], *([peer["source"]] if peer else [])}))})
    if not by_dataset:
        table.missing.append("no probe runs of Prismatic models (family prismatic)")
    return table


# ---------------------------------------------------------------------------------------------
# The decoder: Table 8 (L, D, W1, L·W1), Table 11 (mode alignment), Table 2 (ablation), Table 3 (LoRA)


def _same_selection(a: Run, b: Run) -> bool:
    """Both runs name their dataset selection and it is the same (runs without a digest never pair)."""
    digest = a.summary.get("selection_digest")
    return digest is not None and digest == b.summary.get("selection_digest")


def lipschitz_w1_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "target", "reduction", "n_samples", "L_space", "L_mean", "L_p95",
               "L_pooled_mean", "L_secant_median", "D", "D_reference", "D_eff", "w1_hook", "W1", "W1_ci_low",
               "W1_ci_high", "null_W1", "L_mean_x_W1", "L_p95_x_W1", "source"]
    table = Table("table8_lipschitz_w1", "Decoder Lipschitz constant, diameter and W1 (Table 8)", columns,
                  caption="L: gradient norm of log q(y | z, c) w.r.t. the representation named in `L_space` under "
                          "the row's loss `target` (mean and p95 over samples); `L_pooled_mean`: the same w.r.t. a "
                          "shift shared by all positions (the pooled space of D and W1); `L_secant_median`: the "
                          "paper's 2-NN secant slope over pairs of equal length, a lower-bound cross-check. D: "
                          "diameter of the pooled adapter outputs; `D_reference`: the earlier code's D (max of "
                          "std·√d and sampled pair distances), comparable with the paper's. W1: modal vs text "
                          "representations at `w1_hook` (independent of the target), with "
                          "its bootstrap CI and the text-vs-text floor `null_W1`. L and W1 are paired only when both "
                          "runs drew the same dataset selection; products use this row's L and W1.")
    lips = sorted(runs.of("lipschitz"), key=_order)
    w1s = defaultdict(list)
    for run in runs.of("wasserstein"):
        w1s[(run.model, run.dataset)].append(run)
    used = set()
    for lip in lips:
        s = lip.summary
        candidates = w1s.get((lip.model, lip.dataset), [])
        partners = [w for w in candidates if _same_selection(lip, w)] or [None]
        for w in partners:
            ws = w.summary if w else {}
            w1 = ws.get("w1")
            table.rows.append({"model": lip.model, "dataset": lip.dataset, "seed": lip.seed, "target": s.get("target"),
                               "reduction": s.get("reduction"), "n_samples": s.get("n_samples"),
                               "L_space": s.get("L_space"), "L_mean": s.get("L_mean"), "L_p95": s.get("L_p95"),
                               "L_pooled_mean": s.get("L_pooled_mean"), "L_secant_median": s.get("L_secant_median"),
                               "D": s.get("D"), "D_reference": s.get("D_reference"), "D_eff": s.get("D_eff"),
                               "w1_hook": ws.get("hook"), "W1": w1,
                               "W1_ci_low": ws.get("w1_ci_low"), "W1_ci_high": ws.get("w1_ci_high"),
                               "null_W1": ws.get("null_w1"),
                               "L_mean_x_W1": s["L_mean"] * w1 if w1 is not None and s.get("L_mean") is not None
                               else None,
                               "L_p95_x_W1": s["L_p95"] * w1 if w1 is not None and s.get("L_p95") is not None
                               else None,
                               "source": _sources([lip] + ([w] if w else []))})
            if w is None:
                why = "no wasserstein run over the same selection" if candidates else "no wasserstein run"
                table.missing.append(f"{lip.model} × {lip.dataset}: W1 ({why})")
            else:
                used.add(id(w))
    lip_keys = {(lip.model, lip.dataset) for lip in lips}
    for key, partners in sorted(w1s.items()):
        for w in partners:
            if id(w) not in used:
                ws = w.summary
                table.rows.append({"model": w.model, "dataset": w.dataset, "seed": w.seed, "w1_hook": ws.get("hook"),
                                   "W1": ws.get("w1"), "W1_ci_low": ws.get("w1_ci_low"),
                                   "W1_ci_high": ws.get("w1_ci_high"), "null_W1": ws.get("null_w1"),
                                   "source": w.source})
                why = "no lipschitz run over the same selection" if key in lip_keys else "no lipschitz run"
                table.missing.append(f"{w.model} × {w.dataset}: L ({why})")
    if not table.rows:
        table.missing.append("no lipschitz or wasserstein runs")
    return table


def mode_profile(run: Run) -> list[dict]:
    """The run's modes.csv as numbers (mode, eigenvalue, explained_variance_ratio, rho, label)."""
    path = run.path / "modes.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: (v if k == "label" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]


def modes_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "n_modes", "ms_threshold", "rho_0", "mean_rho_top10", "n_ms",
               "ms_variance_pct", "mode0_variance_pct", "n_modal", "n_text", "source"]
    table = Table("table11_modes", "Mode alignment (Table 11)", columns,
                  caption="Eigenmodes of the pooled adapter-output covariance; ρ_k = text variance / modal variance "
                          "along mode k, text = the LLM's token embeddings of the same samples' transcripts/captions. "
                          "MS: ρ < `ms_threshold`. `ms_variance_pct`: MS share of the top modes' variance. No loss "
                          "target or probe is involved.",
                  digits={"ms_variance_pct": 1, "mode0_variance_pct": 1})
    for run in sorted(runs.of("modes"), key=_order):
        s = run.summary
        profile = mode_profile(run)
        mode0 = 100 * profile[0]["explained_variance_ratio"] if profile else None
        table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed, "n_modes": s.get("n_modes"),
                           "ms_threshold": s.get("ms_threshold"), "rho_0": s.get("rho_0"),
                           "mean_rho_top10": s.get("mean_rho_top10"), "n_ms": s.get("n_ms"),
                           "ms_variance_pct": 100 * s["ms_variance_share"] if "ms_variance_share" in s else None,
                           "mode0_variance_pct": mode0, "n_modal": s.get("n_modal"), "n_text": s.get("n_text"),
                           "source": run.source})
    if not table.rows:
        table.missing.append("no modes runs")
    return table


def ablation_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "target", "variant", "condition", "n_modes_removed",
               "variance_removed_pct", "variance_removed_token_pct", "delta_loss", "delta_ci_low", "delta_ci_high",
               "delta_pct", "frac_of_swap", "class_effect", "t", "p", "n", "source"]
    table = Table("table2_ablation", "Ablation of MS / TA / random modes (Table 2 of Zhao et al., mismatched decoding)",
                  columns,
                  caption="The paper's Table 2 uses the `centred` edit (every position's component along the modes "
                          "set to the pooled modal mean) under the prompt-token loss (`target=reference`); that row "
                          "is kept here, beside edits that stay on the data distribution: `resample` (the component "
                          "from another sample), `position_mean`, `optimal` (a fitted constant). ΔLoss = "
                          "loss(edited) − loss(base) under the row's `target`, with a cluster-bootstrap 95 % interval "
                          "over speakers and sentences; frac_of_swap = ΔLoss / ΔLoss of swapping the whole input for "
                          "another sample's (far above 1: damage from leaving the distribution); class_effect = "
                          "ΔLoss beyond the dose-response curve of random mode subsets at the same variance removed; "
                          "`random_matched:X` = dose-matched random subspaces of X's dimension; t, p: paired t-test.",
                  digits={"variance_removed_pct": 1, "variance_removed_token_pct": 1, "delta_pct": 2, "t": 2,
                          "frac_of_swap": 3})
    for run in sorted(runs.of("ablation"), key=_order):
        s = run.summary
        for c in s.get("conditions", []):
            if "delta_loss" not in c:
                continue
            share, token = c.get("variance_share_removed"), c.get("variance_share_removed_token")
            table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed, "target": s.get("target"),
                               "variant": c.get("variant"), "condition": c.get("condition"),
                               "n_modes_removed": c.get("n_modes_removed"),
                               "variance_removed_pct": 100 * share if share is not None else None,
                               "variance_removed_token_pct": 100 * token if token is not None else None,
                               "delta_loss": c.get("delta_loss"), "delta_ci_low": c.get("delta_cluster_ci_low"),
                               "delta_ci_high": c.get("delta_cluster_ci_high"), "delta_pct": c.get("delta_pct"),
                               "frac_of_swap": c.get("frac_of_swap"), "class_effect": c.get("class_effect"),
                               "t": c.get("t"), "p": c.get("p"), "n": c.get("n"), "source": run.source})
    if not table.rows:
        table.missing.append("no ablation runs")
    return table


def lora_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "label", "objective", "measure", "hook", "probe", "base", "lora", "delta",
               "targeted", "chance", "n", "source"]
    table = Table("table3_lora", "LoRA on the decoder (Table 3)", columns,
                  caption="Probe accuracy on the held-out test part through the base model and with the trained "
                          "adapter (the `targeted` row is the label trained on), and forced-choice task accuracy: "
                          "`task_strict` (the whole answer is the JSON with a verbatim choice), `task_lenient`, and "
                          "`task_likelihood` (the choice with the highest log-probability).",
                  digits={"base": 3, "lora": 3, "delta": 3, "chance": 3})
    for run in sorted(runs.of("lora"), key=_order):
        s = run.summary
        task = s.get("task", {})
        for measure, key in (("task_strict", "accuracy"), ("task_lenient", "lenient_accuracy"),
                             ("task_likelihood", "likelihood_accuracy")):
            base, lora = task.get("base", {}).get(key), task.get("lora", {}).get(key)
            if base is None and lora is None:
                continue
            table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed, "label": s.get("label"),
                               "objective": s.get("objective"), "measure": measure, "base": base, "lora": lora,
                               "delta": lora - base if base is not None and lora is not None else None,
                               "targeted": True, "chance": 1 / len(s["choices"]) if s.get("choices") else None,
                               "n": task.get("lora", {}).get("n"), "source": run.source})
        for info_type, per_hook in sorted(s.get("probe_changes", {}).items()):
            for hook, c in per_hook.items():
                table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed,
                                   "label": s.get("label"), "objective": s.get("objective"),
                                   "measure": f"probe_{info_type}",
                                   "hook": hook_column(hook), "probe": run.settings.get("probe"),
                                   "base": c.get("base"), "lora": c.get("lora"), "delta": c.get("delta"),
                                   "targeted": c.get("targeted"), "chance": c.get("chance"),
                                   "n": s.get("split", {}).get("test", {}).get("n"), "source": run.source})
    if not table.rows:
        table.missing.append("no lora runs")
    return table


def _summary_rows(table: Table, runs: RunSet, experiment: str) -> Table:
    """One row per run of `experiment`, its columns between `seed` and `source` read from the summary."""
    keys = table.columns[table.columns.index("seed") + 1 : table.columns.index("source")]
    for run in sorted(runs.of(experiment), key=_order):
        table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed,
                           **{k: run.summary.get(k) for k in keys}, "source": run.source})
    if not table.rows:
        table.missing.append(f"no {experiment} runs")
    return table


def isotropy_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "target", "n_samples", "n_ms", "n_ta", "g_ta", "g_ms", "g_ta_over_g_ms",
               "spearman_r", "spearman_p", "reference_g_ta_over_g_ms", "source"]
    table = Table("isotropy", "Gradient isotropy across MS and TA modes (§5.4)", columns,
                  caption="Mean gradient magnitude of the row's loss `target` along TA and MS modes and the Spearman "
                          "r between ρ_k and g_k; `reference_*`: the earlier code's mean-over-positions statistic.")
    return _summary_rows(table, runs, "gradproj")


def swap_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "target", "group_by", "subspace", "n_modes", "kl", "delta_ce",
               "delta_ce_ci_low", "delta_ce_ci_high", "delta_ce_pct", "frac_of_all", "delta_ce_t", "delta_ce_p",
               "shift", "kl_per_unit2", "n_samples", "source"]
    table = Table("msswap", "Swapping a sample's position in the MS / TA subspace", columns,
                  caption="Each sample's mean component in the subspace replaced by another `group_by` group's mean; "
                          "KL(p_base ‖ p_swap) over answer positions and the loss change under the row's `target` "
                          "(`delta_ce_pct` relative to the base loss), with a cluster-bootstrap 95 % interval; ALL "
                          "swaps every direction (the reference), `frac_of_all` = the subspace's change / ALL's.")
    for run in sorted(runs.of("msswap"), key=_order):
        s = run.summary
        for subspace in ("MS", "TA", "ALL"):
            if f"delta_ce_{subspace}" not in s:
                continue
            delta = s.get(f"delta_ce_{subspace}")
            base = s.get("mean_loss_base")
            table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed, "target": s.get("target"),
                               "group_by": s.get("group_by"), "subspace": subspace,
                               "n_modes": s.get(f"n_{subspace.lower()}_modes"), "kl": s.get(f"kl_{subspace}"),
                               "delta_ce": delta, "delta_ce_ci_low": s.get(f"delta_ce_{subspace}_cluster_ci_low"),
                               "delta_ce_ci_high": s.get(f"delta_ce_{subspace}_cluster_ci_high"),
                               "frac_of_all": s.get(f"frac_of_all_{subspace}"),
                               "delta_ce_pct": 100 * delta / base if delta is not None and base else None,
                               "delta_ce_t": s.get(f"delta_ce_{subspace}_t"),
                               "delta_ce_p": s.get(f"delta_ce_{subspace}_p"), "shift": s.get(f"shift_{subspace}"),
                               "kl_per_unit2": s.get(f"kl_per_unit2_{subspace}"), "n_samples": s.get("n_samples"),
                               "source": run.source})
    if not table.rows:
        table.missing.append("no msswap runs")
    return table


def gmi_table(runs: RunSet) -> Table:
    columns = ["model", "dataset", "seed", "target", "estimator", "n_samples", "n_alternatives", "gmi_modal",
               "gmi_modal_ci_low", "gmi_modal_ci_high", "gmi_text", "gap_text_minus_modal", "gap_ci_low",
               "gap_ci_high", "log_abs_gap", "probe_label", "probe_information_modal", "accessibility_gap_modal",
               "theorem2_log_rhs_D_eff", "theorem2_log_rhs_pooled_D_eff", "source"]
    table = Table("gmi", "GMI: what the decoder can use of the representation (§4)", columns,
                  caption="Generalised mutual information of the decoder with modal and with text input (nats, "
                          "capped at log(m + 1) for m alternatives), their gap with its bootstrap CI and its log, the "
                          "linear-probe lower bound on I(Z; `probe_label`), the accessibility gap (probe information − "
                          "GMI; empty unless `probe_label` is the transcript, the GMI's variable), and the log of "
                          "Theorem 2's right-hand side with D_eff: with the paper's L (unpooled sequence) and with the "
                          "pooled-space L (shared shift of all positions), the one consistent with W1 and D. A scale "
                          "comparison, not a check: L is a quantile of gradient norms, not a supremum.")
    return _summary_rows(table, runs, "gmi")


def coverage_table(runs: RunSet) -> Table:
    """Which experiments ran for each model x dataset: the map of what the tables could draw on."""
    columns = ["model", "dataset", *PAPER_EXPERIMENTS, "other"]
    table = Table("coverage", "Runs found per model × dataset", columns,
                  caption="Number of finished run dirs per experiment (empty: none).")
    cells: dict[tuple, dict] = {}
    for run in sorted(runs.runs, key=_order):
        row = cells.setdefault((run.model, run.dataset), {"model": run.model, "dataset": run.dataset})
        column = run.experiment if run.experiment in PAPER_EXPERIMENTS else "other"
        row[column] = row.get(column, 0) + 1
    table.rows = list(cells.values())
    return table


def paper_tables(runs: RunSet) -> list[Table]:
    groups = probe_groups(runs)
    return [probe_table(groups), retention_table(groups), prismatic_table(groups), lipschitz_w1_table(runs),
            modes_table(runs), ablation_table(runs), lora_table(runs), isotropy_table(runs), swap_table(runs),
            gmi_table(runs), coverage_table(runs)]
