"""Perceptual attributes: where along the model does a controlled change of the media (brightness,
blur, pitch, gain, ...) stay linearly readable, and does moving along that direction change what
the model says about the media?

Each selected item gets variants (`data.variants`), one attribute changed by known factors. Per
hook and layer (hook=layers: every hidden_states index from the same forward): a binary probe tells
the lowest factor from the highest, a ridge regression predicts the factor (R^2 on held-out items);
splits are by base item, so no item is on both sides. Steering adds alpha * sigma * w at one layer,
w the unit ridge direction and sigma the std of the training rows' projections on it, at the media
positions or all positions; the measure is the change of the expected rating (digits 1-5,
renormalised) after a rating prompt, against the unedited baseline, next to random unit directions
scaled alike.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mcollapse.analysis.attribute import (  # noqa: E402
    fit_ridge,
    projection_std,
    r_squared,
    random_direction,
)
from mcollapse.analysis.transfer import fit_probes, group_split  # noqa: E402
from mcollapse.data.media import load_media  # noqa: E402
from mcollapse.data.variants import NEUTRAL, VERSION, default_factors, variant_records, write_variants  # noqa: E402
from mcollapse.errors import UserError  # noqa: E402
from mcollapse.extraction.extract import extract_modal  # noqa: E402
from mcollapse.models import load_model  # noqa: E402
from mcollapse.models.roles import hidden_state_name, layer_indices, resolve_hidden_states  # noqa: E402
from mcollapse.pipeline.inputs import recorder, selected_records  # noqa: E402
from mcollapse.pipeline.steering import Steering, ratings  # noqa: E402
from mcollapse.runtime import release_memory  # noqa: E402
from mcollapse.store import entry, ids_digest, read_json_object  # noqa: E402
from mcollapse.store.build import build_once  # noqa: E402
from mcollapse.store.digest import key as digest_key  # noqa: E402

log = logging.getLogger(__name__)

QUESTIONS = {
    "brightness": "how bright is this image?", "red": "how red is this image?",
    "saturation": "how colourful is this image?", "contrast": "how strong is the contrast in this image?",
    "blur": "how blurry is this image?", "rotation": "how rotated is this image?",
    "pitch": "how high-pitched is this audio?", "stretch": "how fast is this audio?",
    "gain": "how loud is this audio?",
}
_LAYER = re.compile(r"llm_hs_(\d+)$")


def rating_prompt(attribute: str) -> str:
    return f"On a scale of 1 to 5, {QUESTIONS[attribute]} Answer with one digit."


def variant_plan(cfg) -> dict[str, list[float]]:
    factors = default_factors(cfg.model.modality)
    for name, values in dict(cfg.experiment.factors or {}).items():
        if name in factors:  # the other modality's attributes are in the config too
            factors[name] = [float(v) for v in values]
    wanted = list(cfg.experiment.attributes or factors)
    unknown = [a for a in wanted if a not in factors]
    if unknown:
        raise UserError(f"experiment.attributes {unknown} are not attributes of {cfg.model.modality} "
                        f"({', '.join(factors)})")
    plan = {a: sorted(set(float(v) for v in factors[a])) for a in wanted}
    for attribute, values in plan.items():
        if len(values) < 3:
            raise UserError(f"attribute {attribute} needs at least 3 factors (low, high and between)")
    return plan


def _probe_hooks(names) -> list[str]:
    """Encoder and adapter, then the layers in depth order (the fixed LLM hooks when no layers)."""
    layered = sorted((n for n in names if _LAYER.match(n)), key=lambda n: int(_LAYER.match(n).group(1)))
    front = [n for n in ("encoder_output", "adapter_output") if n in names]
    return front + (layered or [n for n in names if n.startswith("llm_")])


def _variants(cfg, selection, plan):
    cache_dir = Path(cfg.paths.cache_dir)
    records = selection.records
    fields = {"dataset": cfg.dataset.name, "fingerprint": selection.fingerprint,
              "ids": ids_digest([r.id for r in records]), "attributes": plan, "version": VERSION}
    target = entry(cache_dir, "variants", fields).path
    build_once(target, lambda staging: write_variants(records, plan, staging),
               lambda p: (p / "unreadable.json").is_file(), "attribute variants", cache_dir=cache_dir)
    unreadable = read_json_object(target / "unreadable.json")
    usable = [r for r in records if r.id not in unreadable]
    return variant_records(usable, plan, target), unreadable, digest_key(fields)


def _probes(cfg, rec, acts, by_id, plan, hooks):
    seeds = [int(s) for s in cfg.probe.seeds]
    rows, summary = [], {}
    for attribute in plan:
        index = [n for n, i in enumerate(acts.ids) if by_id[i].fields["attribute"] == attribute]
        factor = np.array([by_id[acts.ids[n]].fields["factor"] for n in index])
        groups = [by_id[acts.ids[n]].fields["base_id"] for n in index]
        low, high = factor.min(), factor.max()
        ends = (factor == low) | (factor == high)
        results = {h: {"binary_accuracy": [], "r2": []} for h in hooks}
        for seed in seeds:
            train, test = group_split(groups, cfg.experiment.train_size, seed)
            train_b, test_b = train[ends[train]], test[ends[test]]
            codes = (factor == high).astype(int)
            C = float(cfg.probe.C) if cfg.probe.C is not None else 1.0 / (cfg.probe.weight_decay * len(train_b))
            features = [acts.vectors[h][index] for h in hooks]
            probes = fit_probes([X[train_b] for X in features], codes[train_b], 2, C, cfg.probe.max_iter, cfg.probe.tol)
            for h, X, probe in zip(hooks, features, probes):
                accuracy = float(np.mean(probe.logits(X[test_b]).argmax(axis=1) == codes[test_b]))
                ridge = fit_ridge(X[train], factor[train], cfg.experiment.ridge)
                r2 = r_squared(factor[test], ridge.predict(X[test]))
                results[h]["binary_accuracy"].append(accuracy)
                results[h]["r2"].append(r2)
                extra = {"layer": int(_LAYER.match(h).group(1)) if _LAYER.match(h) else None,
                         "n_train": len(train), "n_test": len(test)}
                rows.append(rec.row(h, attribute, seed, "binary_accuracy", accuracy, chance=0.5, low=low, high=high,
                                    **extra))
                rows.append(rec.row(h, attribute, seed, "r2", r2, **extra))
        summary[attribute] = {h: {k: float(np.mean(v)) for k, v in results[h].items()} for h in hooks}
    return rows, summary


def _steering(cfg, rec, family, acts, by_id, plan, unreadable):
    """Rating shifts along the probe direction and random directions, per attribute."""
    index_l = layer_indices(family.model, [int(cfg.experiment.steer_layer)])[0]
    hook = hidden_state_name(index_l)
    if hook not in acts.vectors:
        raise UserError(f"steering at layer {index_l} needs its activations: add it to hook.llm_layers (hook=layers)")
    target = resolve_hidden_states(family.model, [index_l])[0]
    seed = int(cfg.probe.seeds[0])
    rows, summary = [], {}
    for attribute, factors in plan.items():
        index = [n for n, i in enumerate(acts.ids) if by_id[i].fields["attribute"] == attribute]
        groups = [by_id[acts.ids[n]].fields["base_id"] for n in index]
        factor = np.array([by_id[acts.ids[n]].fields["factor"] for n in index])
        train, test = group_split(groups, cfg.experiment.train_size, seed)
        X = acts.vectors[hook][index]
        w = fit_ridge(X[train], factor[train], cfg.experiment.ridge).direction()
        directions = {"probe": w}
        for k in range(int(cfg.experiment.n_random)):
            directions[f"random_{k}"] = random_direction(X.shape[1], seed + 1 + k)
        sigma = {name: projection_std(X[train], d) for name, d in directions.items()}
        neutral = min(factors, key=lambda f: abs(f - NEUTRAL[attribute]))
        test_bases = sorted({groups[n] for n in test})[: int(cfg.experiment.steer_samples)]
        prompt = rating_prompt(attribute)
        by_factor = {}
        for f in factors:
            samples = [load_media(by_id[_vid(b, attribute, f, by_id)]) for b in test_bases]
            by_factor[f"{f:g}"] = float(np.mean(ratings(family, samples, prompt)))
        samples = [load_media(by_id[_vid(b, attribute, neutral, by_id)]) for b in test_bases]
        baseline = ratings(family, samples, prompt)
        entry_ = {"hook": hook, "layer": index_l, "positions": cfg.experiment.steer_positions,
                  "prompt": prompt, "n_items": len(samples), "neutral_factor": neutral,
                  "baseline": float(baseline.mean()), "rating_by_factor": by_factor, "sigma": sigma, "shift": {}}
        for name, direction in directions.items():
            shifts = []
            for alpha in cfg.experiment.alphas:
                steering = Steering(target, direction, float(alpha) * sigma[name], cfg.experiment.steer_positions)
                steered = ratings(family, samples, prompt, steering)
                if float(alpha) == 0.0:
                    entry_.setdefault("zero_steering_max_abs_diff", {})[name] = float(np.abs(steered - baseline).max())
                shift = float(np.mean(steered - baseline))
                shifts.append(shift)
                rows.append(rec.row(hook, attribute, seed, "rating_shift", shift, alpha=float(alpha), direction=name,
                                    layer=index_l, positions=cfg.experiment.steer_positions,
                                    baseline=float(baseline.mean())))
            entry_["shift"][name] = shifts
        entry_["alphas"] = [float(a) for a in cfg.experiment.alphas]
        summary[attribute] = entry_
    return rows, summary


def _vid(base: str, attribute: str, factor: float, by_id: dict) -> str:
    from mcollapse.data.variants import variant_id

    vid = variant_id(base, attribute, factor)
    if vid not in by_id:
        raise UserError(f"variant {vid} is missing")
    return vid


def run(cfg, run_dir: Path) -> dict:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    plan = variant_plan(cfg)
    with rec.stage("variants"):
        variants, unreadable, variants_key = _variants(cfg, selection, plan)
    rec.counts.update({"n_variants": len(variants), "base_unreadable": unreadable})
    cache_dir = Path(cfg.paths.cache_dir)
    with rec.stage("load_model"):
        family = load_model(cfg.model, cache_dir, cfg.device)
    rec.extra_meta["checkpoint"] = family.checkpoint
    dataset = {"name": f"{cfg.dataset.name}+variants", "fingerprint": variants_key}
    with rec.stage("extract_variants"):
        extraction = extract_modal(family, variants, dataset, cfg.hook, cache_dir, cfg.strict, cfg.flush_every)
    acts = extraction.activations
    rec.counts.update({"n_extracted": len(acts.ids), "variants_skipped": extraction.skipped})
    by_id = {v.id: v for v in variants}
    hooks = _probe_hooks(list(acts.vectors))
    with rec.stage("probes"):
        rows, probes = _probes(cfg, rec, acts, by_id, plan, hooks)
    summary = {"attributes": plan, "hooks": hooks, "probes": probes, "pooling": cfg.hook.pooling}
    if cfg.experiment.steer:
        with rec.stage("steering"):
            steer_rows, summary["steering"] = _steering(cfg, rec, family, acts, by_id, plan, unreadable)
        rows += steer_rows
    del family
    release_memory()
    with rec.stage("report"):
        attribute_figure(summary, run_dir / "attribute.png", title=f"{cfg.model.name} x {cfg.dataset.name}")
    rec.write(rows, summary)
    log.info("results in %s", run_dir)
    return summary


def attribute_figure(summary: dict, path: Path, title: str) -> None:
    """Per attribute: probe accuracy and R^2 along the hooks; the rating shift against alpha for the
    probe and random directions; the unedited rating against the factor."""
    attributes = list(summary["probes"])
    steering = summary.get("steering") or {}
    n_cols = 3 if steering else 1
    fig, axes = plt.subplots(len(attributes), n_cols, figsize=(5 * n_cols, 3 * len(attributes)), squeeze=False)
    hooks = summary["hooks"]
    ticks = [h.replace("llm_hs_", "") .replace("encoder_output", "enc").replace("adapter_output", "adp") for h in hooks]
    for row, attribute in enumerate(attributes):
        per_hook = summary["probes"][attribute]
        ax = axes[row][0]
        ax.plot(range(len(hooks)), [per_hook[h]["binary_accuracy"] for h in hooks], "o-", ms=3, label="low vs high acc")
        ax.plot(range(len(hooks)), [per_hook[h]["r2"] for h in hooks], "s-", ms=3, label="factor R^2")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(hooks)), ticks, fontsize=6, rotation=90)
        ax.set(title=f"{attribute}: probes by hook/layer", ylim=(-0.5, 1.05))
        ax.legend(fontsize=6)
        if attribute in steering:
            s = steering[attribute]
            ax = axes[row][1]
            for name, shifts in s["shift"].items():
                ax.plot(s["alphas"], shifts, "o-" if name == "probe" else ":", label=name)
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set(title=f"rating shift, steering at layer {s['layer']} ({s['positions']})",
                   xlabel="alpha (projection std)")
            ax.legend(fontsize=6)
            ax = axes[row][2]
            xs = [float(f) for f in s["rating_by_factor"]]
            ax.plot(xs, list(s["rating_by_factor"].values()), "o-")
            ax.set(title="unedited rating by factor", xlabel=attribute, ylim=(1, 5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
