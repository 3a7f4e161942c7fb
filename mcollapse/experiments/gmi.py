"""Empirical GMI (Eq. 3) of the LLM as decoder, for modal and for text input, against Theorem 2.

For each sample i with target y_i (its transcript/caption as the answer) the decoder scores y_i
with the true z_i and with m alternatives z'_j drawn from other samples of the same prompt
(Z' ~ P(Z | C), y held fixed); `analysis.gmi` turns the scores into the GMI with a bootstrap CI.
Modal z is the adapter-output sequence; text z is the LLM's token embeddings of the transcript,
so both live where the LLM reads them. The probe's information H(Y) - CE of a linear probe on the
pooled z gives what is *recoverable*; probe information minus GMI is the accessibility gap.
Theorem 2's right-hand side uses L_log from the gradient pass and the conditional W1 in pooled
embedding space: the text z is a function of y, so W1(P_M(Z|y), delta_{z_T(y)}) is the mean
distance of y's modal points to its text point, and E_y W1 = mean_i ||zbar_M,i - zbar_T(y_i)||.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mcollapse.analysis.gmi import gmi_from_scores, gmi_gap, theorem2_rhs
from mcollapse.analysis.lipschitz import diameter, effective_diameter, gradient_norm_stats
from mcollapse.analysis.probes import run_probes
from mcollapse.data.labels import derive_labels
from mcollapse.errors import UserError
from mcollapse.experiments.common import recorder, selected_records
from mcollapse.experiments.llm_side import (
    batch_size_of,
    candidate_scores,
    decoder_inputs,
    gradients,
    modes,
    scored_ids,
)
from mcollapse.experiments.probe import settings_from
from mcollapse.report.decoder_figures import gmi_figure, print_metrics


def alternatives(n: int, m: int, seed: int) -> np.ndarray:
    """(n, m) indices: for each i, m distinct others drawn uniformly (seeded)."""
    if n < 2:
        raise UserError(f"GMI needs at least 2 samples with a transcript/caption, found {n}")
    m = min(m, n - 1)
    rng = np.random.default_rng(seed)
    out = np.empty((n, m), dtype=np.int64)
    for i in range(n):
        others = rng.choice(n - 1, size=m, replace=False)
        out[i] = others + (others >= i)
    return out


def _probe_information(cfg, selection, ids, features: dict, label: str) -> tuple[dict, str | None]:
    """H(Y) - held-out CE of the run's probe settings on each pooled feature set, in nats."""
    by_id = {r.id: r for r in selection.records}
    records = [by_id[i] for i in ids]
    if label == "transcript":
        labels = [" ".join((r.text or "").lower().split()) or None for r in records]
    else:
        column = derive_labels(records, [label], lexical_rule=cfg.dataset.lexical_rule,
                               top_k=int(cfg.dataset.lexical_top_k)).get(label)
        if column is None:
            return {}, f"label '{label}' is not defined for dataset '{cfg.dataset.name}'"
        if column.skipped_reason:
            return {}, column.skipped_reason
        labels = column.values
    outcomes = run_probes(features, labels, settings_from(cfg))
    info, reasons = {}, []
    for name, outcome in outcomes.items():
        if outcome.skipped_reason:
            reasons.append(f"{name}: {outcome.skipped_reason}")
            continue
        info[name] = {"information": outcome.information, "label_entropy": outcome.label_entropy,
                      "log_loss": outcome.mean("log_loss"), "accuracy": outcome.mean("accuracy"),
                      "n_classes": outcome.n_classes, "n_used": outcome.n_used}
    return info, "; ".join(reasons) or None


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    if target.name != "content":
        raise UserError("gmi scores the transcript/caption given z: it needs target=content")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    ids = scored_ids(inputs, "content", exp.n_samples, rec)
    alts = alternatives(len(ids), int(exp.n_alternatives), int(cfg.seed))
    batch = batch_size_of(cfg)
    modal_z = inputs.sequences.subset(ids).arrays
    with rec.stage("text_embeddings"):
        text_z = [inputs.text_sequence(i) for i in ids]
    answers = [inputs.answer(i) for i in ids]
    candidates = np.concatenate([np.arange(len(ids))[:, None], alts], axis=1)  # column 0: the true z

    results, scores = {}, {}
    for kind, zs in (("modal", modal_z), ("text", text_z)):
        with rec.stage(f"scores_{kind}"):
            flat = candidate_scores(inputs, zs, answers, candidates, f"GMI scores ({kind})")
        scores[kind] = flat
        results[kind] = gmi_from_scores(flat[:, 0], flat[:, 1:], estimator=str(exp.estimator), s=float(exp.s),
                                        n_boot=int(exp.n_boot), seed=int(cfg.seed))
    gap = gmi_gap(results["modal"], results["text"], paired=True, n_boot=int(exp.n_boot), seed=int(cfg.seed))

    with rec.stage("bound"):
        pooled_m = np.stack([z.astype(np.float64).mean(axis=0) for z in modal_z])
        pooled_t = np.stack([z.astype(np.float64).mean(axis=0) for z in text_z])
        w1_conditional = float(np.linalg.norm(pooled_m - pooled_t, axis=1).mean())
        union = np.vstack([pooled_m, pooled_t])
        d_s, d_eff = diameter(union), effective_diameter(union).d_eff
        shared = modes(inputs, rec, int(exp.n_modes), float(exp.ms_threshold),  # same pass as lipschitz's
                       rho_normalization=str(exp.rho_normalization))
        grads = gradients(inputs, rec, ids[: int(exp.lipschitz_samples)], target, batch, shared)
        stats = gradient_norm_stats(grads.norms)
        lip = float(stats[str(exp.bound_lipschitz)])
        bounds = {name: theorem2_rhs(lipschitz=lip, w1=w1_conditional, diameter=d).as_dict()
                  for name, d in (("D", d_s), ("D_eff", d_eff))}
    with rec.stage("probe_information"):
        probe_info, probe_skip = _probe_information(cfg, selection, ids, {"modal": pooled_m, "text": pooled_t},
                                                    str(exp.probe_label))

    summary = {"n_samples": len(ids), "n_alternatives": int(alts.shape[1]), "estimator": str(exp.estimator),
               "s": float(exp.s), "target": target.name, "reduction": "sum"}
    for kind, result in results.items():
        summary.update({f"gmi_{kind}": result.gmi, f"gmi_{kind}_ci_low": result.ci_low,
                        f"gmi_{kind}_ci_high": result.ci_high})
        summary[f"mean_true_score_{kind}"] = float(scores[kind][:, 0].mean())
    summary.update({"cap_log_m_plus_1": results["modal"].cap, "gap_text_minus_modal": gap.gap,
                    "gap_ci_low": gap.ci_low, "gap_ci_high": gap.ci_high,
                    "L_log": lip, "L_statistic": str(exp.bound_lipschitz), "n_lipschitz": len(grads.ids),
                    "W1_conditional_pooled": w1_conditional, "D_S": d_s, "D_eff": d_eff})
    for name, bound in bounds.items():
        summary[f"theorem2_rhs_{name}"] = bound["rhs"]
        summary[f"theorem2_log_rhs_{name}"] = bound["log_rhs"]
        summary[f"theorem2_holds_{name}"] = bool(abs(gap.gap) <= bound["rhs"])
    summary["probe_label"] = str(exp.probe_label)
    if probe_skip:
        summary["probe_skipped"] = probe_skip
    for kind, info in probe_info.items():
        summary[f"probe_information_{kind}"] = info["information"]
        summary[f"accessibility_gap_{kind}"] = info["information"] - results[kind].gmi
    rows = [rec.row("adapter_output", "-", int(cfg.seed), name, value, target=target.name)
            for name, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    details = {"gmi": {k: r.as_dict() for k, r in results.items()}, "gap": gap.as_dict(), "theorem2": bounds,
               "probe": probe_info}
    with rec.stage("report"):
        np.savez(run_dir / "gmi_scores.npz", ids=np.array(ids), candidates=candidates, modal=scores["modal"],
                 text=scores["text"])
        gmi_figure({k: r.as_dict() for k, r in results.items()},
                   {k: v["information"] for k, v in probe_info.items()}, run_dir / "gmi.png",
                   f"{cfg.model.name} x {cfg.dataset.name}, n = {len(ids)}\nGMI ({exp.estimator}, "
                   f"m = {alts.shape[1]}) vs probe information (label: {exp.probe_label})")
    rec.write(rows, summary, details)
    print_metrics(f"GMI: {cfg.model.name} x {cfg.dataset.name}", summary)
    return summary
