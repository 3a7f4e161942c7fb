"""Probe transfer per layer across (model, input modality) settings, and a modality probe.

Settings are `<model>/<input>`: the run's model on its media (`main/modal`) and on the texts
(`main/text`), and, with `experiment.other_model`, a second model on the same samples
(`other/text`, plus `other/modal` when it takes the same media). A probe for each label is trained
in one setting and tested in every other setting of the same LLM width on held-out items; the
cosine between the probe directions of two settings is reported per layer. The modality probe
tells a model's media rows from its text rows of the same items (pooled with pads masked), next
to the same probe with the labels shuffled within each item (chance by construction).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mcollapse.analysis.transfer import modality_features, shuffled_within_items, transfer_matrix  # noqa: E402
from mcollapse.data.labels import derive_labels  # noqa: E402
from mcollapse.errors import NothingMeasured, UserError  # noqa: E402
from mcollapse.pipeline.inputs import modal_and_text, recorder, selected_records  # noqa: E402
from mcollapse.pipeline.other_model import other_model_config, other_model_inputs  # noqa: E402

log = logging.getLogger(__name__)

_LAYER = re.compile(r"llm_hs_(\d+)$")


def layer_hooks(names) -> list[str]:
    """The per-layer hooks in depth order; without them, the LLM hooks the preset has."""
    layered = sorted((n for n in names if _LAYER.match(n)), key=lambda n: int(_LAYER.match(n).group(1)))
    return layered or [n for n in names if n.startswith("llm_")]


def _layer_index(hook: str):
    match = _LAYER.match(hook)
    return int(match.group(1)) if match else hook


def _seed_mean(values: np.ndarray) -> np.ndarray:
    """The mean over seeds (axis 0), nan where a pair has no value (different widths)."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _probe_C(cfg, n_train: int) -> float:
    if cfg.probe.C is not None:
        return float(cfg.probe.C)
    return 1.0 / (float(cfg.probe.weight_decay) * n_train)


def _settings(cfg, rec, selection) -> dict:
    extracted = modal_and_text(cfg, rec, selection)
    settings = {"main/modal": extracted.modal}
    if extracted.text is not None:
        settings["main/text"] = extracted.text
    if cfg.experiment.other_model:
        other_cfg = other_model_config(cfg.experiment.other_model, cfg.experiment.other_overrides)
        other = other_model_inputs(cfg, rec, selection, other_cfg, cfg.experiment.text.format)
        for side, extraction in other.items():
            settings[f"other/{side}"] = extraction
    return settings


def _aligned(settings: dict) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """The items every setting has a row for, in one order, and each setting's vectors on them."""
    common = None
    for extraction in settings.values():
        ids = set(extraction.activations.ids)
        common = ids if common is None else common & ids
    order = [i for i in next(iter(settings.values())).activations.ids if i in common]
    vectors = {}
    for name, extraction in settings.items():
        position = {sample: n for n, sample in enumerate(extraction.activations.ids)}
        rows = [position[i] for i in order]
        vectors[name] = {hook: v[rows] for hook, v in extraction.activations.vectors.items()}
    return order, vectors


def run(cfg, run_dir: Path) -> dict:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    settings = _settings(cfg, rec, selection)
    if len(settings) < 2:
        raise UserError("transfer needs two settings: set experiment.text.source or experiment.other_model")
    ids, vectors = _aligned(settings)
    hooks = [h for h in layer_hooks(next(iter(vectors.values())))
             if all(h in v for v in vectors.values())]
    if not hooks:
        raise UserError("no LLM hook common to every setting (use hook=layers)")
    rec.counts["n_items"] = len(ids)
    by_id = {r.id: r for r in selection.records}
    records = [by_id[i] for i in ids]
    wanted = [t for t in cfg.experiment.labels if t in cfg.dataset.info_types]
    columns = derive_labels(records, wanted, lexical_rule=cfg.dataset.lexical_rule, top_k=cfg.dataset.lexical_top_k)
    seeds = [int(s) for s in cfg.probe.seeds]
    names = list(vectors)
    rows, summary, skipped = [], {"settings": names, "hooks": hooks, "transfer": {}, "modality": {}}, {}
    n_train_guess = max(2, round(cfg.probe.train_size * len(ids)))
    C = _probe_C(cfg, n_train_guess)

    with rec.stage("transfer_probes"):
        for label, column in columns.items():
            usable = [v for v in column.values if v is not None]
            if column.skipped_reason or len(set(usable)) < 2:
                skipped[label] = column.skipped_reason or "fewer than two classes"
                continue
            per_layer = {}
            for hook in hooks:
                result = transfer_matrix({n: vectors[n][hook] for n in names}, column.values, ids, seeds, C=C,
                                         train_size=cfg.probe.train_size, standardize=cfg.experiment.standardize,
                                         max_iter=cfg.probe.max_iter, tol=cfg.probe.tol)
                mean_acc = _seed_mean(result.accuracy)
                mean_cos = _seed_mean(result.direction_cosine)
                entry = {"chance": result.chance, "n_classes": len(result.classes), "n_train": result.n_train,
                         "n_test": result.n_test, "converged": result.converged, "accuracy": {},
                         "direction_cosine": {}}
                for a, train in enumerate(names):
                    for b, test in enumerate(names):
                        if not np.isfinite(mean_acc[a, b]):
                            continue
                        entry["accuracy"][f"{train}->{test}"] = float(mean_acc[a, b])
                        if a < b:
                            entry["direction_cosine"][f"{train}|{test}"] = float(mean_cos[a, b])
                        for s, seed in enumerate(seeds):
                            rows.append(rec.row(hook, label, seed, "transfer_accuracy", float(result.accuracy[s, a, b]),
                                                layer=_layer_index(hook), train=train, test=test,
                                                chance=result.per_seed_chance[s], n_classes=len(result.classes)))
                            if a < b:
                                rows.append(rec.row(hook, label, seed, "direction_cosine",
                                                    float(result.direction_cosine[s, a, b]), layer=_layer_index(hook),
                                                    train=train, test=test))
                per_layer[hook] = entry
            summary["transfer"][label] = per_layer

    if cfg.experiment.modality_probe:
        with rec.stage("modality_probe"):
            for model in sorted({n.split("/")[0] for n in names}):
                if f"{model}/modal" not in vectors or f"{model}/text" not in vectors:
                    continue
                per_layer = {}
                for hook in hooks:
                    features, labels, groups = modality_features(vectors[f"{model}/modal"][hook],
                                                                 vectors[f"{model}/text"][hook], ids)
                    real = transfer_matrix({"f": features}, labels, groups, seeds, C=C,
                                           train_size=cfg.probe.train_size, max_iter=cfg.probe.max_iter,
                                           tol=cfg.probe.tol)
                    control = transfer_matrix({"f": features}, shuffled_within_items(labels, groups, seeds[0]),
                                              groups, seeds, C=C, train_size=cfg.probe.train_size,
                                              max_iter=cfg.probe.max_iter, tol=cfg.probe.tol)
                    per_layer[hook] = {"accuracy": float(real.accuracy.mean()),
                                       "shuffled_control": float(control.accuracy.mean()), "chance": 0.5}
                    for s, seed in enumerate(seeds):
                        rows.append(rec.row(hook, "modality", seed, "modality_accuracy", float(real.accuracy[s, 0, 0]),
                                            layer=_layer_index(hook), model_side=model, pooling=cfg.hook.pooling))
                        rows.append(rec.row(hook, "modality", seed, "modality_shuffled_accuracy",
                                            float(control.accuracy[s, 0, 0]), layer=_layer_index(hook),
                                            model_side=model, pooling=cfg.hook.pooling))
                summary["modality"][model] = per_layer
    summary["skipped"] = skipped
    summary["pooling"] = cfg.hook.pooling
    summary["standardize"] = cfg.experiment.standardize
    summary["other_model"] = cfg.experiment.other_model
    if not summary["transfer"] and not summary["modality"]:
        rec.write(rows, summary)
        raise NothingMeasured(f"nothing measured: no label usable on every setting ({skipped}); results in {run_dir}")
    with rec.stage("report"):
        transfer_figure(summary, run_dir / "transfer.png", title=f"{cfg.model.name} x {cfg.dataset.name}")
    rec.write(rows, summary)
    log.info("results in %s", run_dir)
    return summary


def transfer_figure(summary: dict, path: Path, title: str) -> None:
    """Per label: accuracy of every train->test pair and the direction cosines along depth; then the
    modality probe with its shuffled control."""
    labels = list(summary["transfer"])
    n_rows = len(labels) + (1 if summary["modality"] else 0)
    fig, axes = plt.subplots(n_rows, 2, figsize=(11, 3.2 * n_rows), squeeze=False)
    hooks = summary["hooks"]
    x = [_layer_index(h) if isinstance(_layer_index(h), int) else n for n, h in enumerate(hooks)]
    for row, label in enumerate(labels):
        per_layer = summary["transfer"][label]
        first = per_layer[hooks[0]]
        ax = axes[row][0]
        for pair in first["accuracy"]:
            train, test = pair.split("->")
            ax.plot(x, [per_layer[h]["accuracy"].get(pair, np.nan) for h in hooks], "-" if train == test else "--",
                    label=pair)
        ax.axhline(first["chance"], color="grey", lw=0.8, ls=":")
        ax.set(title=f"{label}: train -> test accuracy", xlabel="layer (hidden_states index)", ylim=(0, 1.02))
        ax.legend(fontsize=6)
        ax = axes[row][1]
        for pair in first["direction_cosine"]:
            ax.plot(x, [per_layer[h]["direction_cosine"].get(pair, np.nan) for h in hooks], label=pair)
        ax.set(title=f"{label}: probe direction cosine", xlabel="layer (hidden_states index)", ylim=(-1, 1))
        ax.legend(fontsize=6)
    if summary["modality"]:
        ax = axes[-1][0]
        for model, per_layer in summary["modality"].items():
            ax.plot(x, [per_layer[h]["accuracy"] for h in hooks], label=f"{model}: modal vs text")
            ax.plot(x, [per_layer[h]["shuffled_control"] for h in hooks], ":", label=f"{model}: shuffled control")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=f"modality probe (pads masked, pooling={summary['pooling']})", xlabel="layer", ylim=(0, 1.02))
        ax.legend(fontsize=6)
        axes[-1][1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
