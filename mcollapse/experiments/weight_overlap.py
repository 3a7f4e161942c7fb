"""Modality subnetworks: do the audio/image and the transcript/caption rely on the same LLM weights?

Per linear layer of the LLM (q, k, v, o, gate, up, down) and sparsity s, a P mask is calibrated on
the samples' adapter outputs and a T mask on the same samples' transcripts/captions (their token
embeddings), each put at the placeholder of the model's prompt and measured at those positions
(pipeline.subnetworks). Reported: the IoU of the kept weights per layer and module, per module
type, per layer and overall, next to the (1 - s) / (1 + s) of unrelated masks. With prune_eval, the
content loss on modal and on text inputs with each mask applied, against the unpruned LLM.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.ablation import summarise
from mcollapse.analysis.subnetworks import overlap_counts, random_iou, summarise_iou
from mcollapse.errors import UserError
from mcollapse.models.decoder import compose, pad_sequences
from mcollapse.pipeline.decoder_side import batch_size_of, decoder_inputs, scored_ids
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.pipeline.subnetworks import calibrate, linear_layers, pruned
from mcollapse.progress import progress_bar
from mcollapse.report.skip_figures import overlap_figure

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    sparsities = [float(s) for s in exp.sparsities]
    if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities):
        raise UserError(f"experiment.sparsities must be a non-empty list of values in (0, 1), got {sparsities}")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    decoder, model = inputs.decoder, inputs.family.model
    ids = scored_ids(inputs, "content", exp.n_samples, rec)
    modal = [inputs.sequences.subset(ids).arrays[n] for n in range(len(ids))]
    with rec.stage("text_embeddings"):
        text = [inputs.text_sequence(i) for i in ids]
    batch = batch_size_of(cfg)

    masks = {}
    with rec.stage("calibrate"):
        n_blocks = len({b for b, _ in _keys(model)})
        total = 2 * len(sparsities) * n_blocks if exp.sequential else 0
        with progress_bar("calibrate", total=total) as advance:
            for side, zs in (("P", modal), ("T", text)):
                masks[side] = calibrate(decoder, zs, sparsities, batch, bool(exp.sequential), advance)

    rows, results, grids = [], [], {}
    modules = list(dict.fromkeys(name for _, name in _keys(model)))
    for s in sparsities:
        counts = {key: overlap_counts(masks["P"][s][key], masks["T"][s][key]) for key in masks["P"][s]}
        summary_s = summarise_iou(counts)
        grid = np.full((n_blocks, len(modules)), np.nan)
        for (b, name), value in summary_s["per_pair"].items():
            grid[b, modules.index(name)] = value
            rows.append(rec.row(f"llm_block_{b}", "-", cfg.seed, "iou", value, module=name, sparsity=s))
        grids[s] = (grid, modules)
        rows += [rec.row("llm", "-", cfg.seed, "iou", v, module=m, sparsity=s, scope="module_type")
                 for m, v in summary_s["per_module"].items()]
        rows += [rec.row(f"llm_block_{b}", "-", cfg.seed, "iou", v, module="all", sparsity=s, scope="layer")
                 for b, v in summary_s["per_layer"].items()]
        rows.append(rec.row("llm", "-", cfg.seed, "iou_mean", summary_s["mean"], sparsity=s))
        rows.append(rec.row("llm", "-", cfg.seed, "iou_random", random_iou(s), sparsity=s))
        results.append({"sparsity": s, "iou_mean": summary_s["mean"], "iou_random": random_iou(s),
                        "iou_per_module": summary_s["per_module"],
                        "iou_per_layer": {str(b): v for b, v in summary_s["per_layer"].items()}})

    pruning = None
    if exp.prune_eval:
        with rec.stage("prune_eval"):
            pruning = _prune_eval(inputs, ids, modal, text, masks, sparsities, batch, cfg.target.reduction)
        for p in pruning:
            rows += [rec.row("llm", "-", cfg.seed, m, p[m], sparsity=p["sparsity"], mask=p["mask"],
                             input=p["input"]) for m in ("mean_loss", "delta_loss", "delta_pct", "p") if m in p]
    summary = {"n_samples": len(ids), "n_blocks": n_blocks, "modules": modules, "sequential": bool(exp.sequential),
               "calibration": "placeholder positions of the prompt; P: adapter output, T: transcript embeddings",
               "results": results, "prune_eval": pruning}
    with rec.stage("report"):
        with (run_dir / "iou.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sparsity", "block", *modules])
            for s, (grid, _) in grids.items():
                for b in range(n_blocks):
                    writer.writerow([s, b, *(f"{v:.6f}" for v in grid[b])])
        overlap_figure(grids, run_dir / "weight_overlap.png",
                       f"{cfg.model.name} x {cfg.dataset.name}: P vs T Wanda masks (n={len(ids)}, "
                       f"sequential={bool(exp.sequential)})")
    rec.write(rows, summary)
    for r in results:
        log.info("weight_overlap s=%.2f: mean IoU %.4f (random %.4f); per module %s", r["sparsity"], r["iou_mean"],
                 r["iou_random"], {m: round(v, 3) for m, v in r["iou_per_module"].items()})
    return summary


def _keys(model):
    return list(linear_layers(model))


def _prune_eval(inputs, ids, modal, text, masks, sparsities, batch, reduction) -> list[dict]:
    """Content loss (-log q(transcript | z, prompt)) per sample on modal and text inputs, unpruned and
    with each side's mask; loss changes paired against the unpruned LLM."""
    answers = [inputs.answer(i) for i in ids]

    def losses(zs):
        out = []
        with torch.no_grad():
            for start in range(0, len(zs), batch):
                part = zs[start : start + batch]
                rows = compose(inputs.family, [len(z) for z in part], answers[start : start + batch], "content",
                               reduction)
                out.append(-inputs.decoder.scores(rows, pad_sequences(part)).double().cpu().numpy())
        return np.concatenate(out)

    sides = {"modal": modal, "text": text}
    base = {name: losses(zs) for name, zs in sides.items()}
    out = [{"sparsity": 0.0, "mask": "none", "input": name, "mean_loss": float(v.mean())} for name, v in base.items()]
    for s in sparsities:
        for mask_side in ("P", "T"):
            with pruned(inputs.family.model, masks[mask_side][s]):
                for name, zs in sides.items():
                    out.append({"sparsity": s, "mask": mask_side, "input": name,
                                **summarise(base[name], losses(zs))})
    return out
