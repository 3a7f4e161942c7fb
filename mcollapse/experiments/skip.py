"""Computation skipping: how much of the LLM can the audio/image (or the text) go without?

Each condition (operation x gating x interval) skips LLM blocks, or their MLP sub-blocks, at the
gated positions (pipeline.block_skip). Per condition and sample: the loss of the run's target
(target=content: -log q(transcript | z, prompt)) against the unskipped run, with a paired t-test;
the greedy output against the unskipped greedy output (exact match, token agreement) and against
the reference (WER for speech, token F1 for captions); and the share of the LLM's FLOPs skipped
on the scored rows (analysis.skipping). Batches are a resumable pass in the store.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.ablation import summarise
from mcollapse.analysis.skipping import (
    GATINGS,
    OPERATIONS,
    block_flops,
    greedy_agreement,
    skipped_blocks,
    skipped_flops,
)
from mcollapse.analysis.transcripts import mean_token_f1, word_error_rate
from mcollapse.errors import UserError
from mcollapse.models.decoder import compose, pad_sequences
from mcollapse.models.roles import block_linears, decoder_blocks
from mcollapse.pipeline.block_skip import gate_for, skipping
from mcollapse.pipeline.decoder_side import answers_key, batch_size_of, decoder_inputs, scored_ids
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.report.skip_figures import skip_figure
from mcollapse.store import entry, ids_digest, sharded_pass

log = logging.getLogger(__name__)

SKIP_PASS_VERSION = 1


def conditions(exp, n_blocks: int) -> list[dict]:
    """operation x gating x interval; `exit` ignores the interval (one condition per gating)."""
    unknown = (set(exp.operations) - set(OPERATIONS)) | (set(exp.gating) - set(GATINGS))
    if unknown or not exp.operations or not exp.gating or not exp.intervals:
        raise UserError(f"experiment.operations must be a non-empty subset of {list(OPERATIONS)}, gating of "
                        f"{list(GATINGS)}, and intervals non-empty; got {list(exp.operations)}, {list(exp.gating)}, "
                        f"{list(exp.intervals)}")
    if any(int(i) < 1 for i in exp.intervals):
        raise UserError(f"experiment.intervals must be positive, got {list(exp.intervals)}")
    if exp.parallel_norm not in ("input", "post"):
        raise UserError(f"experiment.parallel_norm must be input or post, got {exp.parallel_norm!r}")
    out = []
    for op in exp.operations:
        for gating in exp.gating:
            for interval in ([None] if op == "exit" else [int(i) for i in exp.intervals]):
                blocks = skipped_blocks(n_blocks, op, int(exp.start), exp.end, interval or 1)
                label = f"{op}/{gating}" + (f"/every{interval}" if interval else f"/after{exp.start}")
                out.append({"name": label, "operation": op, "gating": gating, "interval": interval,
                            "blocks": blocks})
    return out


def run(cfg, run_dir: Path) -> dict:
    exp, target = cfg.experiment, cfg.target
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    family, decoder = inputs.family, inputs.decoder
    layers = decoder_blocks(family.model)
    conds = conditions(exp, len(layers))
    flops = block_flops({n: (m.in_features, m.out_features) for n, m in block_linears(layers[0]).items()})
    ids = scored_ids(inputs, target.name, exp.n_samples, rec)
    seqs = inputs.sequences.subset(ids)
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    parts = family.prompt_token_parts()
    batch = batch_size_of(cfg)
    width = int(exp.max_new_tokens)

    def compute(rows):
        zs = [torch.as_tensor(seqs.arrays[r], dtype=torch.float32) for r in rows]
        lengths = [len(z) for z in zs]
        rows_batch = compose(family, lengths, [answers[r] for r in rows] if answers else None, target.name,
                             target.reduction)
        prompt_lengths = [len(parts[0]) + n + len(parts[1]) for n in lengths]
        n_rows, n_cols = len(rows), len(conds) + 1
        losses, saved = np.empty((n_rows, n_cols)), np.zeros((n_rows, n_cols))
        tokens = np.full((n_rows, n_cols, width), -1, dtype=np.int64)
        valid = rows_batch.attention_mask.bool().numpy()
        total = np.array([skipped_flops(flops, len(layers), 0, "block", valid[b:b + 1], valid[b:b + 1], False)[1]
                          for b in range(n_rows)])
        with torch.no_grad():
            for c, cond in enumerate([None, *conds]):
                if cond is None:
                    losses[:, c] = -decoder.scores(rows_batch, pad_sequences(zs)).double().cpu().numpy()
                    generated = decoder.greedy(zs, parts, width)
                else:
                    gate = gate_for(cond["gating"], rows_batch.z_rows, rows_batch.z_cols, prompt_lengths,
                                    rows_batch.input_ids.shape[1])
                    with skipping(family.model, cond["blocks"], cond["operation"], gate, exp.parallel_norm):
                        losses[:, c] = -decoder.scores(rows_batch, pad_sequences(zs)).double().cpu().numpy()
                    greedy_gate = gate_for(cond["gating"], rows_batch.z_rows, rows_batch.z_cols, prompt_lengths,
                                           max(prompt_lengths))
                    with skipping(family.model, cond["blocks"], cond["operation"], greedy_gate, exp.parallel_norm):
                        generated = decoder.greedy(zs, parts, width)
                    mask = gate.first.numpy()
                    for b in range(n_rows):
                        saved[b, c] = skipped_flops(flops, len(layers), len(cond["blocks"]), cond["operation"],
                                                    mask[b:b + 1], valid[b:b + 1],
                                                    keys_needed=cond["gating"] == "modality")[0]
                for b, sequence in enumerate(generated):
                    tokens[b, c, : len(sequence)] = sequence
        return {"losses": losses, "saved": saved, "total": total, "tokens": tokens}

    lengths = np.array([len(a) for a in seqs.arrays]) + (np.array([len(a) for a in answers]) if answers else 0)
    order = np.argsort(lengths, kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    fields = {"kind": "skip", "version": SKIP_PASS_VERSION, "sequences": inputs.decoder_key, "ids": ids_digest(ids),
              "target": target.name, "reduction": target.reduction, "batch": batch, "dtype": str(family.dtype),
              "conditions": [(c["name"], c["blocks"]) for c in conds], "parallel_norm": exp.parallel_norm,
              "max_new_tokens": width, "prompt": parts, **answers_key(inputs, ids, target)}
    gather = sharded_pass(rec, entry(inputs.cache_dir, "skip", fields).path, batches, "skip", compute,
                          inputs.cache_dir, fields)
    losses, saved, total, tokens = gather("losses"), gather("saved"), gather("total"), gather("tokens")

    with rec.stage("statistics"):
        decoded = [[family.tokenizer.decode([t for t in tokens[i, c] if t >= 0], skip_special_tokens=True).strip()
                    for i in range(len(ids))] for c in range(len(conds) + 1)]
        references = [inputs.texts[i] for i in ids]
        quality = _quality(family.modality, references, decoded[0])
        sequences = [[[int(t) for t in tokens[i, c] if t >= 0] for i in range(len(ids))] for c in range(len(conds) + 1)]
        results = []
        for c, cond in enumerate(conds, start=1):
            entry_ = {k: cond[k] for k in ("name", "operation", "gating", "interval")}
            entry_.update({"n_blocks_skipped": len(cond["blocks"]), "blocks": cond["blocks"],
                           "flops_skipped_fraction": float(saved[:, c].sum() / total.sum()),
                           **summarise(losses[:, 0], losses[:, c]),
                           **greedy_agreement(sequences[0], sequences[c]),
                           **{f"{k}": v for k, v in _quality(family.modality, references, decoded[c]).items()}})
            results.append(entry_)
    metric_names = ("n_blocks_skipped", "flops_skipped_fraction", "delta_loss", "delta_pct", "delta_ci_low",
                    "delta_ci_high", "p", "t", "mean_loss", "exact_match", "token_agreement", "wer", "token_f1")
    rows = [rec.row("llm", "-", cfg.seed, m, r[m], condition=r["name"], operation=r["operation"],
                    gating=r["gating"], interval=r["interval"], target=target.name)
            for r in results for m in metric_names if m in r]
    rows += [rec.row("llm", "-", cfg.seed, m, v, condition="baseline", target=target.name)
             for m, v in {"mean_loss": float(losses[:, 0].mean()), **quality}.items()]
    summary = {"target": target.name, "reduction": target.reduction, "n_samples": len(ids),
               "n_blocks": len(layers), "start": int(exp.start), "end": exp.end, "parallel_norm": exp.parallel_norm,
               "max_new_tokens": width, "mean_loss_baseline": float(losses[:, 0].mean()),
               **{f"baseline_{k}": v for k, v in quality.items()}, "conditions": results}
    with rec.stage("report"):
        with (run_dir / "per_sample.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", "loss_baseline", *(f"loss_{c['name']}" for c in conds),
                             "greedy_baseline", *(f"greedy_{c['name']}" for c in conds)])
            for i, sample_id in enumerate(ids):
                writer.writerow([sample_id, *(f"{v:.8g}" for v in losses[i]), *(d[i] for d in decoded)])
        skip_figure(results, run_dir / "skip.png",
                    f"{cfg.model.name} x {cfg.dataset.name} (target={target.name}, n={len(ids)})")
    rec.write(rows, summary)
    for r in results:
        log.info("skip %-28s flops %5.1f%%  dloss %+8.3f (p=%.3g)  exact %.2f  agree %.2f", r["name"],
                 100 * r["flops_skipped_fraction"], r["delta_loss"], r["p"], r["exact_match"],
                 r["token_agreement"])
    return summary


def _quality(modality: str, references: list[str], hypotheses: list[str]) -> dict:
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    if not pairs:
        return {}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    if modality == "audio":
        return {"wer": word_error_rate(refs, hyps)}
    return {"token_f1": mean_token_f1(refs, hyps)}
