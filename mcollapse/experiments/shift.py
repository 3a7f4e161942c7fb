"""Representation shift between a base LLM and its multimodal descendant (or a model and its LoRA-tuned self).

Both models read the same token ids: the selected samples' transcripts or captions, tokenized alike
by both tokenizers (refused otherwise), BOS first where either tokenizer adds one. Each model runs
text-only and causally with its own position convention. At every hidden_states index l = 0..L
(0: the input of the first block; l: the output of block l, before the final norm at L) the valid
tokens (no BOS, no pads) of model a (the run's model) and model b (`experiment.other_model`) are
compared by `analysis.shift`: cosine and L2 of the mean vectors, mean per-token L2 and cosine,
linear CKA over tokens (a seeded subset of `max_cka_tokens`, the same positions in both) and over
items (each text's mean vector). With `experiment.sae.path`, a JumpReLU SAE trained on the output of
block `experiment.sae.layer` (0-based, Gemma Scope's numbering: hidden_states index layer + 1)
encodes both models' tokens there.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mcollapse.analysis.shift import LayerShift, SaeShift, linear_cka, load_sae
from mcollapse.errors import UserError
from mcollapse.models import load_model
from mcollapse.pipeline.inputs import recorder, selected_records, text_model_config
from mcollapse.pipeline.paired_text import block_targets, hidden_stack, perturb_llm, shared_token_rows, token_batch
from mcollapse.report.shift_figure import shift_figure

log = logging.getLogger(__name__)


def other_model_config(cfg):
    """The model b config: `other_model` (or a copy of the run's model), with `other_lora` put on it."""
    exp = cfg.experiment
    if exp.other_model:
        from mcollapse.cli import config_dir

        other = text_model_config(exp.other_model, Path(config_dir()), "experiment.other_model")
    else:
        other = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
        other.lora = None
    if exp.other_lora:
        other.lora = str(exp.other_lora)
    return other


def _describe(model_cfg) -> str:
    return model_cfg.name + (f"+lora({Path(model_cfg.lora).name})" if model_cfg.lora else "")


def _sae_site(exp, n_layers: int):
    if not exp.sae.path:
        return None, None
    if exp.sae.layer is None:
        raise UserError("experiment.sae.layer must say which block's output the SAE was trained on (0-based)")
    if not 0 <= exp.sae.layer < n_layers:
        raise UserError(f"experiment.sae.layer {exp.sae.layer} is out of range: the LLM has {n_layers} blocks")
    path = sae_file(exp.sae.path)
    try:
        sae = load_sae(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"experiment.sae.path {path}: not a readable SAE archive ({err})") from None
    return sae, exp.sae.layer + 1


def sae_file(spec) -> Path:
    """The params.npz `experiment.sae.path` names. Anything but a zip archive is refused here: numpy
    would take it for pickled data and suggest loading it unsafely, which a downloaded file never needs."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / "params.npz"
    if not path.is_file():
        raise UserError(f"experiment.sae.path {path} does not exist (give a params.npz or its directory)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"experiment.sae.path {path} is not an .npz archive (a Gemma Scope params.npz with "
                        "W_enc, b_enc, threshold, W_dec, b_dec); the file is damaged or of another kind")
    return path


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    if exp.sae.path:
        sae_file(exp.sae.path)  # a bad file fails before any model is loaded
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    records = [r for r in selection.records if (r.text or "").strip()]
    if exp.n_samples is not None:
        records = records[: exp.n_samples]
    if len(records) < 2:
        raise UserError(f"shift needs at least 2 samples with a transcript/caption, found {len(records)}")
    other_cfg = other_model_config(cfg)
    same_model = OmegaConf.to_container(other_cfg) == OmegaConf.to_container(cfg.model)
    if same_model and not exp.other_perturbation:
        log.warning("shift compares model '%s' with itself: every distance is 0 and every similarity 1",
                    cfg.model.name)
    cache_dir = Path(cfg.paths.cache_dir)
    with rec.stage("load_model"):
        model_a = load_model(cfg.model, cache_dir, cfg.device)
        model_b = load_model(other_cfg, cache_dir, cfg.device)
    changed = perturb_llm(model_b.model, float(exp.other_perturbation), int(cfg.seed))
    tokens = shared_token_rows(model_a, model_b, [r.id for r in records], [r.text for r in records])
    targets_a, targets_b = block_targets(model_a.model), block_targets(model_b.model)
    if len(targets_a) != len(targets_b):
        raise UserError(f"the two LLMs differ in depth ({len(targets_a) - 1} vs {len(targets_b) - 1} blocks)")
    n_hidden = len(targets_a)
    sae, sae_index = _sae_site(exp, n_hidden - 1)

    has_bos = tokens.bos is not None
    lengths = [len(r) - int(has_bos) for r in tokens.rows]
    total = int(sum(lengths))
    rng = np.random.default_rng(cfg.seed)
    cka_pick = np.zeros(total, dtype=bool)
    cka_pick[rng.choice(total, size=min(total, exp.max_cka_tokens), replace=False)] = True
    layer_stats = [LayerShift() for _ in range(n_hidden)]
    cka_rows = {side: [[] for _ in range(n_hidden)] for side in "ab"}
    item_means = {side: [[] for _ in range(n_hidden)] for side in "ab"}
    sae_stats = SaeShift(sae) if sae is not None else None
    batch_size = exp.batch_size or cfg.model.batch_size
    offset = 0
    with rec.stage("forward"):
        for start in range(0, len(tokens.rows), batch_size):
            rows = tokens.rows[start:start + batch_size]
            batch = token_batch(tokens.ids[start:start + batch_size], rows, has_bos, model_a.pad_token_id)
            ids, attention = batch.inputs["input_ids"], batch.inputs["attention_mask"]
            valid = batch.modal_token_mask
            per_item = valid.sum(dim=1).tolist()
            pick = cka_pick[offset: offset + int(valid.sum())]
            offset += int(valid.sum())
            stacks = {"a": hidden_stack(model_a.model, targets_a, ids, attention),
                      "b": hidden_stack(model_b.model, targets_b, ids, attention)}
            for layer in range(n_hidden):
                flat = {side: stacks[side][layer].float().cpu()[valid].numpy() for side in "ab"}
                layer_stats[layer].update(flat["a"], flat["b"])
                for side in "ab":
                    cka_rows[side][layer].append(flat[side][pick])
                    bounds = np.cumsum([0, *per_item])
                    item_means[side][layer].extend(flat[side][lo:hi].mean(axis=0) for lo, hi in zip(bounds, bounds[1:]))
                if layer == sae_index:
                    sae_stats.update(flat["a"], flat["b"])
    del model_a, model_b

    per_layer = []
    with rec.stage("statistics"):
        for layer in range(n_hidden):
            row = {"layer": layer, "block": "input" if layer == 0 else layer - 1, **layer_stats[layer].result()}
            row["cka_tokens"] = linear_cka(np.concatenate(cka_rows["a"][layer]), np.concatenate(cka_rows["b"][layer]))
            row["cka_items"] = linear_cka(np.stack(item_means["a"][layer]), np.stack(item_means["b"][layer]))
            per_layer.append(row)
    sae_result = sae_stats.result() if sae_stats is not None else {}

    last = per_layer[-1]
    summary = {
        "model_a": _describe(cfg.model), "model_b": _describe(other_cfg), "n_items": len(tokens.ids),
        "n_tokens": total, "n_cka_tokens": int(cka_pick.sum()), "bos_excluded": has_bos, "n_hidden_states": n_hidden,
        "layer_convention": "hidden_states index l: 0 = input of the first block, l = output of block l "
                            "(layers[l-1], before the final norm)",
        "other_perturbation": float(exp.other_perturbation), "perturbed_tensors": changed,
        "mean_cosine_of_means": float(np.mean([r["cosine_of_means"] for r in per_layer])),
        "mean_cka_tokens": float(np.nanmean([r["cka_tokens"] for r in per_layer])),
        "last_cosine_of_means": last["cosine_of_means"], "last_cka_tokens": last["cka_tokens"],
        "last_relative_token_l2": last["relative_token_l2"],
        "min_cka_tokens_layer": int(np.nanargmin([r["cka_tokens"] for r in per_layer])),
    }
    if sae is not None:
        summary.update({"sae_path": str(exp.sae.path), "sae_block": int(exp.sae.layer),
                        "sae_hidden_states_index": sae_index, "sae_width": int(sae.w_enc.shape[1]),
                        "sae_site": f"output of block {exp.sae.layer} (0-based layers[{exp.sae.layer}]), "
                                    f"hidden_states index {sae_index}",
                        **sae_result})
    rec.counts.update({"n_texts": len(tokens.ids), "n_empty_texts": len(tokens.skipped_empty)})
    rec.extra_meta.update({"other_model": OmegaConf.to_container(other_cfg, resolve=True)})

    rows = []
    for entry in per_layer:
        for metric, value in entry.items():
            if metric in ("layer", "block") or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            rows.append(rec.row(f"layer_{entry['layer']}", "-", cfg.seed, metric, value, layer=entry["layer"],
                                other=summary["model_b"]))
    for metric, value in sae_result.items():
        if math.isfinite(value):
            rows.append(rec.row(f"layer_{sae_index}", "sae", cfg.seed, metric, value, layer=sae_index,
                                other=summary["model_b"]))
    with rec.stage("report"):
        shift_figure(per_layer, run_dir / "shift.png",
                     f"{summary['model_a']} vs {summary['model_b']} on {cfg.dataset.name}: {len(tokens.ids)} texts, "
                     f"{total} tokens ({'BOS and pads' if has_bos else 'pads'} excluded)", sae_index)
    rec.write(rows, summary, {"per_layer": per_layer})
    print(f"shift {summary['model_a']} vs {summary['model_b']}: mean cos(means) {summary['mean_cosine_of_means']:.4f}, "
          f"mean token CKA {summary['mean_cka_tokens']:.4f}, last layer relative token L2 "
          f"{summary['last_relative_token_l2']:.4f}" + (f", SAE Jaccard {sae_result['sae_mean_jaccard']:.3f}"
                                                        if sae_result else ""))
    return summary
