"""Empirical GMI (Eq. 3) of the LLM as decoder, for modal and for text input, against Theorem 2.

For each sample i with target y_i (its transcript/caption as the answer) the decoder scores y_i
with the true z_i and with m alternatives z'_j drawn from other samples of the same prompt
(Z' ~ P(Z | C), y held fixed); `analysis.gmi` turns the scores into the GMI with a bootstrap CI.
Modal z is the adapter-output sequence; text z is the LLM's token embeddings of the transcript,
so both live where the LLM reads them. The probe's information H(Y) - CE of a linear probe on the
pooled z gives what is *recoverable*; probe information minus GMI is the accessibility gap, reported
only when the probe's label is the transcript itself (the variable the GMI is about).
Theorem 2's right-hand side is reported as its log beside the GMI gap, never as a pass/fail: W1
and D are on pooled vectors, a quantile of gradient norms stands in for a supremum, and exp(L D)
overflows on real models. Two L's enter it: the paper's (a norm over the unpooled sequence, so the
bound mixes spaces) and the pooled-space one (the gradient w.r.t. a shift shared by all positions),
which is consistent with W1 and D. The conditional W1: the text z is a function of y, so
W1(P_M(Z|y), delta_{z_T(y)}) is the mean distance of y's modal points to its text point.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mcollapse.analysis.gmi import conditional_w1_to_points, gmi_from_scores, gmi_gap, theorem2_rhs
from mcollapse.analysis.lipschitz import diameter, effective_diameter, gradient_norm_stats
from mcollapse.analysis.probes import run_probes
from mcollapse.data.labels import derive_labels
from mcollapse.errors import UserError
from mcollapse.experiments.probe import settings_from
from mcollapse.pipeline.decoder_side import (
    answers_key,
    cached_candidate_scores,
    decoder_inputs,
    gradient_batch_size,
    gradients,
    scored_ids,
    shared_modes,
)
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.report.decoder_figures import gmi_figure, print_metrics
from mcollapse.store import ids_digest


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
                               top_k=cfg.dataset.lexical_top_k).get(label)
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


def accessibility_gaps(probe_label: str, probe_info: dict, gmis: dict) -> tuple[dict, str | None]:
    """Probe information minus GMI per input kind, only when both concern the transcript: with any
    other label the two numbers are about different variables and are reported apart (reason given)."""
    if probe_label != "transcript":
        return {}, (f"probe_label '{probe_label}' is not the GMI's variable (the transcript): probe information "
                    "and GMI are reported apart")
    return {kind: info["information"] - gmis[kind] for kind, info in probe_info.items()}, None


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    if target.name != "content":
        raise UserError("gmi scores the transcript/caption given z: it needs target=content")
    if target.reduction != "sum":
        raise UserError("gmi compares summed answer scores with L_log: it needs target.reduction=sum")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    ids = scored_ids(inputs, "content", exp.n_samples, rec)
    alts = alternatives(len(ids), exp.n_alternatives, cfg.seed)
    modal_z = inputs.sequences.subset(ids).arrays
    with rec.stage("text_embeddings"):
        text_z = [inputs.text_sequence(i) for i in ids]
    answers = [inputs.answer(i) for i in ids]
    candidates = np.concatenate([np.arange(len(ids))[:, None], alts], axis=1)  # column 0: the true z

    results, scores = {}, {}
    for kind, zs in (("modal", modal_z), ("text", text_z)):
        flat = cached_candidate_scores(inputs, rec, zs, answers, candidates, f"scores_{kind}",
                                       {"input": kind, "ids": ids_digest(ids), **answers_key(inputs, ids, cfg.target)})
        scores[kind] = flat
        results[kind] = gmi_from_scores(flat[:, 0], flat[:, 1:], estimator=exp.estimator, s=exp.s,
                                        n_boot=exp.n_boot, seed=cfg.seed)
    gap = gmi_gap(results["modal"], results["text"], paired=True, n_boot=exp.n_boot, seed=cfg.seed)

    with rec.stage("bound"):
        pooled_m = np.stack([z.astype(np.float64).mean(axis=0) for z in modal_z])
        pooled_t = np.stack([z.astype(np.float64).mean(axis=0) for z in text_z])
        w1_conditional = conditional_w1_to_points(pooled_m, pooled_t)
        union = np.vstack([pooled_m, pooled_t])
        d_s, d_eff = diameter(union), effective_diameter(union).d_eff
        shared = shared_modes(cfg, inputs, rec)  # lipschitz's pass when lipschitz_samples = gradients.n_samples
        lipschitz_ids = scored_ids(inputs, "content", exp.lipschitz_samples, rec, record=False)  # lipschitz's draw
        grads = gradients(inputs, rec, lipschitz_ids, target, gradient_batch_size(cfg), shared)
        statistic = exp.bound_lipschitz
        lip = float(gradient_norm_stats(grads.norms)[statistic])
        lip_pooled = float(gradient_norm_stats(grads.shift_norms)[statistic])
        bounds = {f"{space}{name}": theorem2_rhs(lipschitz=L, w1=w1_conditional, diameter=d).as_dict()
                  for space, L in (("", lip), ("pooled_", lip_pooled)) for name, d in (("D", d_s), ("D_eff", d_eff))}
    with rec.stage("probe_information"):
        probe_info, probe_skip = _probe_information(cfg, selection, ids, {"modal": pooled_m, "text": pooled_t},
                                                    exp.probe_label)

    summary = {"n_samples": len(ids), "n_alternatives": int(alts.shape[1]), "estimator": exp.estimator,
               "s": exp.s, "target": target.name, "reduction": "sum"}
    for kind, result in results.items():
        summary.update({f"gmi_{kind}": result.gmi, f"gmi_{kind}_ci_low": result.ci_low,
                        f"gmi_{kind}_ci_high": result.ci_high})
        summary[f"mean_true_score_{kind}"] = float(scores[kind][:, 0].mean())
    summary.update({"cap_log_m_plus_1": results["modal"].cap, "gap_text_minus_modal": gap.gap,
                    "gap_ci_low": gap.ci_low, "gap_ci_high": gap.ci_high,
                    "log_abs_gap": math.log(abs(gap.gap)) if gap.gap else -math.inf,
                    "L_log": lip, "L_log_pooled": lip_pooled, "L_statistic": statistic,
                    "n_lipschitz": len(grads.ids), "W1_conditional_pooled": w1_conditional, "D_S": d_s,
                    "D_eff": d_eff})
    for name, bound in bounds.items():
        summary[f"theorem2_log_rhs_{name}"] = bound["log_rhs"]
    summary.update({  # why the log right-hand side is a scale comparison, not a check of Theorem 2
        "theorem2_L_space": "adapter-output sequence, unpooled (Frobenius norm over positions)",
        "theorem2_L_pooled_space": "pooled adapter output (gradient w.r.t. a shift shared by all positions)",
        "theorem2_W1_D_space": "pooled adapter output and pooled text embeddings",
        "theorem2_sup_stand_in": f"{statistic} of {len(grads.ids)} per-sample gradient norms, not a supremum",
        "theorem2_rhs_overflows": any(math.isinf(b["rhs"]) for b in bounds.values())})
    summary["probe_label"] = exp.probe_label
    if probe_skip:
        summary["probe_skipped"] = probe_skip
    gaps, gap_skip = accessibility_gaps(exp.probe_label, probe_info, {k: r.gmi for k, r in results.items()})
    for kind, info in probe_info.items():
        summary[f"probe_information_{kind}"] = info["information"]
    summary.update({f"accessibility_gap_{kind}": value for kind, value in gaps.items()})
    if gap_skip:
        summary["accessibility_gap_skipped"] = gap_skip
    rows = [rec.row("adapter_output", "-", cfg.seed, name, value, target=target.name)
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
