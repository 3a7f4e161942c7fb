"""The logit lens on P (media) and T (text) tokens at every LLM layer.

p = softmax(lm_head(final_norm(h))) for every stored token at every layer: the stored layers are
raw residual-stream states (extraction.layers), so the final norm is applied exactly once, also at
the last index. Per layer and side: the mean token entropy; KL(p_l || p_{l+k}) of the same token
between layers; KL between P and T at the same layer, on distributions pooled over all items and
on matched items (each item's P mixture against its own T mixture); the most frequent top-1 and
top-5 token ids at chosen layers.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis import lens
from mcollapse.errors import UserError
from mcollapse.extraction.layers import SIDES, final_norm_and_head
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.pipeline.layer_inputs import layer_inputs
from mcollapse.runtime import release_memory

log = logging.getLogger(__name__)


def default_layers(n_layers: int) -> list[int]:
    last = n_layers - 1
    return sorted({0, last // 4, last // 2, (3 * last) // 4, last})


def lens_statistics(tokens, norm, head, steps, table_layers, device) -> dict:
    """Everything the lens measures, item by item (one item's tokens at all layers at a time)."""
    n_layers = tokens.n_layers
    entropy_sum = {s: np.zeros(n_layers) for s in SIDES}
    n_tokens = dict.fromkeys(SIDES, 0)
    step_sum = {(s, k): np.zeros(n_layers - k) for s in SIDES for k in steps if k < n_layers}
    pooled_sum = dict.fromkeys(SIDES)  # (L+1, V) sum over items of each item's mixture probabilities
    matched = []  # per item: KL(P mixture || T mixture) per layer
    top1 = {(s, layer): Counter() for s in SIDES for layer in table_layers}
    top5 = {(s, layer): Counter() for s in SIDES for layer in table_layers}
    param = next(head.parameters())
    with torch.no_grad():
        for n in range(len(tokens.ids)):
            mixtures = {}
            for side in SIDES:
                h = torch.from_numpy(tokens.item_tokens(side, n).astype(np.float32)).to(device, param.dtype)
                h = h.transpose(0, 1)  # (L+1, tokens, d)
                logp = lens.log_probs(head(norm(h)).float())  # (L+1, tokens, V)
                entropy_sum[side] += lens.entropy(logp).sum(dim=1).cpu().numpy()
                n_tokens[side] += logp.shape[1]
                for (s, k) in step_sum:
                    if s == side:
                        step_sum[(s, k)] += lens.kl(logp[:-k], logp[k:]).sum(dim=1).cpu().numpy()
                for layer in table_layers:
                    lens.count_ids(lens.top_ids(logp[layer], 1), top1[(side, layer)])
                    lens.count_ids(lens.top_ids(logp[layer], min(5, logp.shape[-1])), top5[(side, layer)])
                mixtures[side] = lens.mixture(logp, dim=1)  # (L+1, V)
                probs = mixtures[side].exp()
                pooled_sum[side] = probs if pooled_sum[side] is None else pooled_sum[side] + probs
            matched.append(lens.kl(mixtures["P"], mixtures["T"]).cpu().numpy())
    pooled_log = {s: (pooled_sum[s] / len(tokens.ids)).log() for s in SIDES}
    return {
        "entropy": {s: entropy_sum[s] / n_tokens[s] for s in SIDES},
        "kl_step": {f"{s}_k{k}": v / n_tokens[s] for (s, k), v in step_sum.items()},
        "kl_PT_pooled": lens.kl(pooled_log["P"], pooled_log["T"]).cpu().numpy(),
        "kl_TP_pooled": lens.kl(pooled_log["T"], pooled_log["P"]).cpu().numpy(),
        "kl_PT_matched": np.mean(matched, axis=0),
        "kl_PT_matched_std": np.std(matched, axis=0),
        "top1": top1, "top5": top5,
    }


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    steps = sorted({int(k) for k in exp.steps})
    if any(k < 1 for k in steps):
        raise UserError("experiment.steps must be positive layer offsets")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = layer_inputs(cfg, rec, selection, keep_model=True)
    tokens, family = inputs.tokens, inputs.family
    n_layers = tokens.n_layers
    table_layers = default_layers(n_layers) if exp.layers is None else sorted({int(v) for v in exp.layers})
    if any(not 0 <= v < n_layers for v in table_layers):
        raise UserError(f"experiment.layers must lie in 0..{n_layers - 1}")
    norm, head = final_norm_and_head(family)
    with rec.stage("lens"):
        stats = lens_statistics(tokens, norm, head, steps, table_layers, family.device)
    tokenizer = family.tokenizer
    rows, curves = [], {}
    for side in SIDES:
        curves[f"entropy_{side}"] = stats["entropy"][side].tolist()
        for layer, value in enumerate(stats["entropy"][side]):
            rows.append(rec.row(f"layer_{layer}", f"entropy-{side}", cfg.seed, "entropy", float(value), layer=layer))
    for name, values in stats["kl_step"].items():
        curves[f"kl_step_{name}"] = values.tolist()
        for layer, value in enumerate(values):
            rows.append(rec.row(f"layer_{layer}", f"kl-step-{name}", cfg.seed, "kl", float(value), layer=layer))
    for name in ("kl_PT_pooled", "kl_TP_pooled", "kl_PT_matched"):
        curves[name] = stats[name].tolist()
        for layer, value in enumerate(stats[name]):
            extra = {"std": float(stats["kl_PT_matched_std"][layer])} if name == "kl_PT_matched" else {}
            rows.append(rec.row(f"layer_{layer}", name.replace("_", "-"), cfg.seed, "kl", float(value), layer=layer,
                                **extra))
    tables, table_rows = {}, []
    for which in ("top1", "top5"):
        for (side, layer), counter in stats[which].items():
            common = counter.most_common(int(exp.top_n))
            total = sum(counter.values())
            if which == "top1":
                tables[(side, layer)] = [(_token_text(tokenizer, i), c) for i, c in common]
            for rank, (token_id, count) in enumerate(common):
                table_rows.append({"which": which, "side": side, "layer": layer, "rank": rank + 1,
                                   "token_id": token_id, "text": _token_text(tokenizer, token_id), "count": count,
                                   "fraction": count / total if total else 0.0})
    vocab_size = int(head.weight.shape[0])
    del family, inputs, norm, head
    release_memory()
    with rec.stage("report"):
        from mcollapse.report.lens_figures import lens_figure, top_tokens_figure

        title = f"{cfg.model.name} x {cfg.dataset.name}"
        lens_figure(curves, run_dir / "logit_lens.png", title=f"logit lens: {title}")
        top_tokens_figure(tables, run_dir / "top_tokens.png", title=f"most frequent top-1 tokens: {title}")
        _write_table(run_dir / "top_tokens.csv", table_rows)
    summary = {
        "n_layers": n_layers, "n_items": len(tokens.ids), "table_layers": table_layers,
        "entropy_P_mean": float(np.mean(stats["entropy"]["P"])),
        "entropy_T_mean": float(np.mean(stats["entropy"]["T"])),
        "kl_PT_matched_mean": float(np.mean(stats["kl_PT_matched"])),
        "kl_PT_pooled_mean": float(np.mean(stats["kl_PT_pooled"])),
        "vocab_size": vocab_size,
        "norm": "final norm applied once at every layer (stored layers are raw block outputs)",
    }
    rec.write(rows, summary, details={"curves": curves, "top_tokens": table_rows})
    log.info("logit lens: mean entropy P %.3f, T %.3f nats; KL(P||T) matched %.3f", summary["entropy_P_mean"],
             summary["entropy_T_mean"], summary["kl_PT_matched_mean"])
    return summary


def _write_table(path: Path, rows: list[dict]) -> None:
    from mcollapse.store import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["which", "side", "layer", "rank", "token_id", "text", "count",
                                                    "fraction"])
        writer.writeheader()
        writer.writerows(rows)
