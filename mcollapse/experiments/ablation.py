"""Causal ablation (paper §5.4, Table 2): does removing MS modes from the decoder's input hurt it?

Each condition projects a set of modes out of every position of the cached adapter-output
sequence; the LLM alone scores the target for the baseline and every condition, the conditions of
a batch stacked as rows of one forward. Per-sample loss = -log q(y | z, c) with the run's target
(`target=content` by default; `target=reference` to compare with the paper's Table 2).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.ablation import VARIANTS, conditions, empty_controls, project_out, summarise, variance_share
from mcollapse.errors import UserError
from mcollapse.experiments.common import recorder, selected_records
from mcollapse.experiments.llm_side import answers_key, batch_size_of, decoder_inputs, eigenbasis_for, scored_ids
from mcollapse.models.decoder import compose, pad_sequences
from mcollapse.report.decoder_figures import ablation_figure, print_ablation_table
from mcollapse.store import entry, ids_digest, sharded_pass

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    unknown = set(exp.variants) - set(VARIANTS)
    if unknown or not exp.variants:
        raise UserError(f"experiment.variants must be a non-empty subset of {list(VARIANTS)}, got {list(exp.variants)}")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    basis, alignment, basis_source = eigenbasis_for(cfg, inputs, rec)
    conds = conditions(alignment.is_ms, basis.eigenvalues, n_random=int(exp.n_random), seed=int(cfg.seed),
                       ms_k=[int(k) for k in exp.ms_k])
    if not conds:
        raise UserError(f"no MS mode among the {alignment.rho.size} modes (ms_threshold={alignment.ms_threshold}, "
                        f"rho_normalization={alignment.rho_normalization}): nothing to ablate")
    empty = empty_controls(alignment.is_ms, int(exp.n_random))
    for name in empty:
        log.warning("ablation: condition %s is empty (%d MS, %d TA modes) and left out of the results",
                    name, alignment.n_ms, alignment.n_ta)
    columns = condition_columns(exp.variants, conds)
    ids = scored_ids(inputs, target.name, exp.n_samples, rec)
    seqs = inputs.sequences.subset(ids)
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    vectors = torch.as_tensor(basis.vectors, dtype=torch.float32)
    mean = torch.as_tensor(basis.mean, dtype=torch.float32)
    batch = batch_size_of(cfg)
    per_forward = int(exp.rows_per_forward or 4 * batch)

    def score(zs, sample_rows):
        targets = [answers[r] for r in sample_rows] if answers else None
        rows_batch = compose(inputs.family, [len(z) for z in zs], targets, target.name, target.reduction)
        with torch.no_grad():
            return inputs.decoder.scores(rows_batch, pad_sequences(zs)).double().cpu().numpy()

    def losses(rows):
        return {"losses": condition_losses(seqs.arrays, rows, columns, vectors, mean, score, per_forward)}

    order = np.argsort([len(a) for a in seqs.arrays], kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    fields = {"kind": "ablation", "sequences": inputs.decoder_key, "ids": ids_digest(ids),
                     "basis": basis_source, "target": target.name,
                     "columns": [(name, list(c.modes) if c else None) for name, _, c in columns],
                     "reduction": target.reduction, "batch": batch, "dtype": str(inputs.family.dtype),
              **answers_key(inputs, ids, target)}
    table = sharded_pass(rec, entry(inputs.cache_dir, "ablation", fields).path, batches, "ablation", losses,
                         inputs.cache_dir, fields)("losses")

    with rec.stage("statistics"):
        results = condition_summaries(table, columns, conds, exp.variants, basis.eigenvalues)
    rows = [rec.row("adapter_output", "-", int(cfg.seed), metric, value, condition=r["condition"],
                    variant=r["variant"], target=target.name, reduction=target.reduction)
            for r in results for metric, value in r.items()
            if metric not in ("condition", "variant") and isinstance(value, (int, float))]
    summary = {"target": target.name, "reduction": target.reduction, "n_samples": len(ids),
               "n_modes": int(alignment.rho.size), "n_ms": alignment.n_ms, "n_ta": alignment.n_ta,
               "ms_threshold": alignment.ms_threshold, "rho_normalization": alignment.rho_normalization,
               "empty_conditions": empty, "eigenbasis": basis_source,
               "mean_loss_baseline": float(table[:, 0].mean()), "conditions": results}
    with rec.stage("report"):
        with (run_dir / "per_sample.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", *(f"loss_{name}" for name, _, _ in columns)])
            for i, sample_id in enumerate(ids):
                writer.writerow([sample_id, *(f"{v:.8g}" for v in table[i])])
        ablation_figure(results, run_dir / "ablation.png",
                        f"{cfg.model.name} x {cfg.dataset.name} (target={target.name}, n={len(ids)})")
    rec.write(rows, summary)
    print_ablation_table(results, f"ablation: {cfg.model.name} x {cfg.dataset.name} (target={target.name})")
    return summary


def condition_columns(variants, conds) -> list[tuple]:
    """(name, variant, condition) per loss column: the baseline, then every variant x condition."""
    return [("baseline", None, None)] + [(f"{v}/{c.label}", v, c) for v in variants for c in conds]


def condition_losses(arrays, rows, columns, vectors: torch.Tensor, mean: torch.Tensor, score,
                     per_forward: int) -> np.ndarray:
    """Loss -score(z) of each sample in `rows` (indices into `arrays`) under every column, (len(rows),
    len(columns)). `score(zs, sample_rows)` gives log q(y | z) for a list of sequences, each paired
    with its sample; at most `per_forward` of them go to one call, a sample's columns kept together."""
    out = np.empty((len(rows), len(columns)))
    items = [(n, r, c) for n, r in enumerate(rows) for c in range(len(columns))]
    for start in range(0, len(items), per_forward):
        part = items[start : start + per_forward]
        zs = [_ablated(arrays[r], columns[c], vectors, mean) for _, r, c in part]
        for (n, _, c), value in zip(part, score(zs, [r for _, r, _ in part])):
            out[n, c] = -value
    return out


def _ablated(z: np.ndarray, column, vectors: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    _, variant, cond = column
    z = torch.as_tensor(z, dtype=torch.float32)
    if cond is None:
        return z
    return project_out(z, vectors[list(cond.modes)], mean if variant == "centred" else None)


def condition_summaries(table, columns, conds, variants, eigenvalues) -> list[dict]:
    """One row per variant x condition; random draws pooled (per-sample mean over seeds) with the
    spread of their per-draw mean change."""
    base = table[:, 0]
    index = {name: c for c, (name, _, _) in enumerate(columns)}
    out = []
    for variant in variants:
        groups: dict[str, list] = {}
        for cond in conds:
            key = cond.name if cond.name != "ms_k" else cond.label
            groups.setdefault(key, []).append(cond)
        for key, members in groups.items():
            losses = np.stack([table[:, index[f"{variant}/{c.label}"]] for c in members])
            entry = {"condition": key, "variant": variant, "n_modes_removed": len(members[0].modes),
                     "variance_share_removed": float(np.mean([variance_share(eigenvalues, c.modes) for c in members])),
                     **summarise(base, losses.mean(axis=0))}
            if len(members) > 1:
                per_draw = [summarise(base, row)["delta_pct"] for row in losses]
                entry.update({"n_draws": len(members), "draw_delta_pct_std": float(np.std(per_draw, ddof=1)),
                              "draw_delta_pct_min": float(np.min(per_draw)),
                              "draw_delta_pct_max": float(np.max(per_draw))})
            out.append(entry)
    return out
