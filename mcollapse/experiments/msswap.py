"""MS swap: does the decoder read *where* a sample sits in the MS subspace, compared with the TA one?

For a grouping label (default speaker), each sample's mean component in the MS subspace is
replaced by another group's mean (seeded draws, several per sample); separately the same in the
TA subspace (the other kept modes). The LLM alone gives the next-token distributions at the
answer positions for the original and every swapped input, stacked as rows of one forward;
reported: KL(p_base || p_swap) per answer position, the loss change, the shift's size and KL per
unit squared shift, with paired tests of MS against TA. The reference `ALL` applies the same swap to
every direction (the sample's whole mean becomes the other group's): each subspace's loss change is
also given as a fraction of it (`frac_of_all_MS`, `frac_of_all_TA`), with cluster-bootstrap
intervals over `stats.cluster_by`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.stats import cluster_bootstrap_mean, paired_t
from mcollapse.analysis.swap import draw_partners, kl_per_position, swap_shift
from mcollapse.data.labels import derive_labels
from mcollapse.errors import UserError
from mcollapse.models.decoder import IGNORE, compose, pad_sequences
from mcollapse.pipeline.clusters import cluster_labels
from mcollapse.pipeline.decoder_side import batch_size_of, scored_ids
from mcollapse.pipeline.mode_edits import cached_pass, start_mode_edits
from mcollapse.report.decoder_figures import msswap_figure, print_metrics

SUBSPACES = ("MS", "TA", "ALL")  # ALL: the swap in every direction, the reference
MSSWAP_VERSION = 2  # 2: shards hold the ALL reference


def _groups(cfg, selection, ids) -> dict[str, str]:
    by_id = {r.id: r for r in selection.records}
    label = cfg.experiment.group_by
    column = derive_labels([by_id[i] for i in ids], [label], lexical_rule=cfg.dataset.lexical_rule,
                           top_k=cfg.dataset.lexical_top_k)[label]
    if column.skipped_reason:
        raise UserError(f"msswap cannot group by '{label}' on '{cfg.dataset.name}': {column.skipped_reason}")
    return {i: v for i, v in zip(ids, column.values) if v is not None}


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    edits = start_mode_edits(cfg, run_dir)
    rec, selection, inputs = edits.rec, edits.selection, edits.inputs
    basis, alignment, basis_source = edits.basis, edits.alignment, edits.basis_source
    if alignment.n_ms == 0 or alignment.n_ta == 0:
        raise UserError(f"msswap needs MS and TA modes; the basis has {alignment.n_ms} MS and {alignment.n_ta} TA "
                        f"(ms_threshold={alignment.ms_threshold}, rho_normalization={alignment.rho_normalization})")
    group_of = _groups(cfg, selection, inputs.sequences.ids)
    if len(set(group_of.values())) < 2:
        raise UserError(f"'{exp.group_by}' gives fewer than 2 groups among the usable samples")
    pooled = dict(zip(inputs.sequences.ids, inputs.sequences.pooled()))
    means = {g: np.mean([pooled[i] for i in group_of if group_of[i] == g], axis=0) for g in set(group_of.values())}
    ids = scored_ids(inputs, target.name, exp.n_samples, rec, among=group_of)
    rec.counts["n_unlabelled_skipped"] = len(inputs.sequences.ids) - len(group_of)
    partners = draw_partners([group_of[i] for i in ids], exp.n_draws, cfg.seed)
    seqs = inputs.sequences.subset(ids)
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    modes = {"MS": torch.as_tensor(basis.vectors[alignment.is_ms], dtype=torch.float32),
             "TA": torch.as_tensor(basis.vectors[~alignment.is_ms], dtype=torch.float32),
             "ALL": torch.eye(basis.dim, dtype=torch.float32)}
    group_mean = {g: torch.as_tensor(m, dtype=torch.float32) for g, m in means.items()}
    n_draws = exp.n_draws

    def scored(variants, r):
        batch = compose(inputs.family, [len(z) for z in variants], [answers[r]] * len(variants) if answers else None,
                        target.name, target.reduction)
        with torch.no_grad():
            log_p, row_of = inputs.decoder.scored_log_probs(batch, pad_sequences(variants))
        return log_p, row_of, batch.targets[batch.targets != IGNORE].to(log_p.device)

    def measure(rows):
        return swap_measures(seqs.arrays, rows, partners, modes, group_mean, scored, target.reduction)

    batch = batch_size_of(cfg)
    batches = [np.arange(s, min(s + batch, len(ids))) for s in range(0, len(ids), batch)]
    gather = cached_pass(cfg, edits, "msswap", ids, batches, measure, group_by=exp.group_by, n_draws=n_draws,
                         seed=cfg.seed, version=MSSWAP_VERSION)
    data = {name: gather(name) for name in ["loss_base"] + [f"{k}_{s}" for k in ("kl", "dce", "shift")
                                                               for s in SUBSPACES]}
    with rec.stage("statistics"):
        summary = _summary(data, alignment, exp, target, len(ids), len(means), basis_source)
        clusters, cluster_info = cluster_labels([inputs.records[i] for i in ids], list(cfg.stats.cluster_by))
        summary.update(_relative_to_all(data, clusters, cfg.stats.n_boot, cfg.seed))
        summary["clusters"] = cluster_info
    rows = [rec.row("adapter_output", "-", cfg.seed, name, value, group_by=exp.group_by, target=target.name)
            for name, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    with rec.stage("report"):
        with (run_dir / "per_sample.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            measured = [f"{k}_{s}" for s in SUBSPACES for k in ("kl", "dce", "shift")]
            writer.writerow(["sample_id", "group", "draw", "partner", "loss_base", *measured])
            for i, sample_id in enumerate(ids):
                for d in range(n_draws):
                    writer.writerow([sample_id, group_of[sample_id], d, partners[i][d], f"{data['loss_base'][i]:.8g}",
                                     *(f"{data[name][i, d]:.8g}" for name in measured)])
        msswap_figure(data, run_dir / "msswap.png",
                      f"{cfg.model.name} x {cfg.dataset.name}: swap by {exp.group_by} (n={len(ids)}, "
                      f"{n_draws} draws, target={target.name})")
    rec.write(rows, summary)
    print_metrics(f"MS swap: {cfg.model.name} x {cfg.dataset.name} by {exp.group_by}", summary)
    return summary


def swap_measures(arrays, rows, partners, modes: dict, group_mean: dict, scored, reduction: str) -> dict:
    """Per sample in `rows` (indices into `arrays` and `partners`) and per draw: KL(p_base || p_swap)
    averaged over the scored positions, the loss change and the shift's norm, for each subspace.

    `scored(variants, r)` runs the decoder on sample r's original and swapped sequences and returns
    (log_p (N, V) at the scored positions, row_of (N,) the variant of each, targets (N,) the tokens);
    the loss is minus the target's log-probability, summed or averaged over positions (`reduction`)."""
    n_draws = len(partners[rows[0]]) if len(rows) else 0
    names = list(modes)
    out = {f"{k}_{s}": np.empty((len(rows), n_draws)) for k in ("kl", "dce", "shift") for s in names}
    out["loss_base"] = np.empty(len(rows))
    reduce = (lambda x: -x.sum()) if reduction == "sum" else (lambda x: -x.mean())
    for n, r in enumerate(rows):
        z = torch.as_tensor(arrays[r], dtype=torch.float32)
        variants, shifts = [z], []
        for subspace in names:
            for partner in partners[r]:
                shift = swap_shift(z, modes[subspace], group_mean[partner])
                variants.append(z + shift)
                shifts.append(float(shift.norm()))
        log_p, row_of, targets = scored(variants, r)
        token = log_p.gather(1, targets[:, None])[:, 0]
        per_row = [token[row_of == v] for v in range(len(variants))]
        base_loss = float(reduce(per_row[0]))
        base = log_p[row_of == 0]
        out["loss_base"][n] = base_loss
        for v in range(1, len(variants)):
            subspace, draw = names[(v - 1) // n_draws], (v - 1) % n_draws
            out[f"kl_{subspace}"][n, draw] = float(kl_per_position(base, log_p[row_of == v]).mean())
            out[f"dce_{subspace}"][n, draw] = float(reduce(per_row[v])) - base_loss
            out[f"shift_{subspace}"][n, draw] = shifts[v - 1]
    return out


def _relative_to_all(data, clusters, n_boot: int, seed: int) -> dict:
    """Each subspace's loss change with a cluster-bootstrap interval, and as a fraction of the swap in
    every direction (ALL)."""
    out = {}
    everything = data["dce_ALL"].mean(axis=1)
    for s in SUBSPACES:
        dce = data[f"dce_{s}"].mean(axis=1)
        if len(dce) > 1:
            ci = cluster_bootstrap_mean(dce, clusters, n_resamples=n_boot, seed=seed)
            out.update({f"delta_ce_{s}_cluster_ci_low": ci["ci_low"], f"delta_ce_{s}_cluster_ci_high": ci["ci_high"]})
        if s != "ALL":
            out[f"frac_of_all_{s}"] = float(dce.mean() / everything.mean()) if everything.mean() != 0 else float("nan")
    return out


def _summary(data, alignment, exp, target, n, n_groups, basis_source) -> dict:
    """Per subspace: mean KL, loss change (t-test vs 0), shift size, KL per unit^2; MS vs TA paired."""
    out = {"n_samples": n, "n_groups": n_groups, "n_draws": exp.n_draws, "group_by": exp.group_by,
           "n_ms_modes": alignment.n_ms, "n_ta_modes": alignment.n_ta,
           "rho_normalization": alignment.rho_normalization, "target": target.name,
           "reduction": target.reduction, "eigenbasis": basis_source, "mean_loss_base": float(data["loss_base"].mean())}
    per_unit = {}
    for s in SUBSPACES:
        kl, dce, shift = (data[f"{k}_{s}"].mean(axis=1) for k in ("kl", "dce", "shift"))
        per_unit[s] = (data[f"kl_{s}"] / np.maximum(data[f"shift_{s}"], 1e-12) ** 2).mean(axis=1)
        change = paired_t(dce) if n > 1 else {"mean": float(dce.mean()), "t": float("nan"), "p": float("nan"),
                                               "ci_low": float("nan"), "ci_high": float("nan")}
        out.update({f"kl_{s}": float(kl.mean()), f"kl_{s}_median": float(np.median(kl)),
                    f"delta_ce_{s}": change["mean"], f"delta_ce_{s}_t": change["t"], f"delta_ce_{s}_p": change["p"],
                    f"delta_ce_{s}_ci_low": change["ci_low"], f"delta_ce_{s}_ci_high": change["ci_high"],
                    f"shift_{s}": float(shift.mean()), f"kl_per_unit2_{s}": float(per_unit[s].mean())})
    if n > 1:
        for name, a, b in (("kl", data["kl_MS"].mean(1), data["kl_TA"].mean(1)),
                           ("kl_per_unit2", per_unit["MS"], per_unit["TA"])):
            test = paired_t(a, b)
            out.update({f"{name}_MS_minus_TA": test["mean"], f"{name}_MS_vs_TA_t": test["t"],
                        f"{name}_MS_vs_TA_p": test["p"]})
    return out
