"""2-D maps of pooled P (media) and T (text) vectors at chosen LLM layers.

The P and T vectors of all items at one layer are mapped together (PCA, the fast default, or
seeded t-SNE), and drawn coloured by modality and by each label the dataset has; a last panel
per row is the kernel density of the first coordinate per modality. Coordinates go to
`embedding_map.csv` and `embedding_map.npz`; rows of results.csv hold the first coordinate's
separation between P and T (difference of the means over the pooled std) per layer and method.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from mcollapse.analysis.similarity import unit
from mcollapse.data.labels import derive_labels
from mcollapse.errors import UserError
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.pipeline.layer_inputs import layer_inputs

log = logging.getLogger(__name__)

METHODS = ("pca", "tsne")


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal coordinates of the rows of x, and their explained variance ratios."""
    centred = np.asarray(x, dtype=np.float64) - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]
    total = float((s ** 2).sum())
    return coords, (s[:2] ** 2 / total if total > 0 else np.zeros(2))


def tsne_2d(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        np.asarray(x, dtype=np.float64))


def separation(first: np.ndarray, groups: np.ndarray) -> float:
    """|mean_P - mean_T| of the first coordinate over the pooled std (0: no separation)."""
    a, b = first[groups == "P"], first[groups == "T"]
    spread = np.sqrt((a.var() + b.var()) / 2)
    return float(abs(a.mean() - b.mean()) / spread) if spread > 0 else 0.0


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    for method in exp.methods:
        if method not in METHODS:
            raise UserError(f"experiment.methods: '{method}' is not one of {', '.join(METHODS)}")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    tokens = layer_inputs(cfg, rec, selection).tokens
    last = tokens.n_layers - 1
    layers = sorted({0, last // 2, last}) if exp.layers is None else sorted({int(v) for v in exp.layers})
    if any(not 0 <= v <= last for v in layers):
        raise UserError(f"experiment.layers must lie in 0..{last}")
    by_id = {r.id: r for r in selection.records}
    records = [by_id[i] for i in tokens.ids]
    labels = derive_labels(records, list(cfg.dataset.info_types), lexical_rule=cfg.dataset.lexical_rule,
                           top_k=cfg.dataset.lexical_top_k)
    label_columns = {name: col.values for name, col in labels.items() if not col.skipped_reason}
    n = len(tokens.ids)
    modality = np.array(["P"] * n + ["T"] * n, dtype=object)
    rows, panels, coords_out, csv_rows, summary = [], [], {}, [], {"separation": {}}
    for method in exp.methods:
        for layer in layers:
            points = unit(np.concatenate([tokens.pooled["P"][:, layer], tokens.pooled["T"][:, layer]]))
            with rec.stage(f"map_{method}"):
                if method == "pca":
                    coords, ratios = pca_2d(points)
                else:
                    coords, ratios = tsne_2d(points, exp.perplexity, int(cfg.seed)), None
            coords_out[f"{method}_layer{layer}"] = coords
            sep = separation(coords[:, 0], modality)
            summary["separation"][f"{method}_layer{layer}"] = sep
            rows.append(rec.row(f"layer_{layer}", "modality", cfg.seed, "first_coordinate_separation", sep,
                                method=method, layer=layer))
            if ratios is not None:
                for k, ratio in enumerate(ratios):
                    rows.append(rec.row(f"layer_{layer}", "modality", cfg.seed, f"explained_variance_{k + 1}",
                                        float(ratio), method=method, layer=layer))
            row = [{"title": f"{method} layer {layer}: modality", "x": coords[:, 0], "y": coords[:, 1],
                    "groups": modality}]
            for name, values in label_columns.items():
                groups = np.array([str(v) for v in list(values) * 2], dtype=object)
                row.append({"title": f"{method} layer {layer}: {name}", "x": coords[:, 0], "y": coords[:, 1],
                            "groups": groups})
            row.append({"title": f"{method} layer {layer}: density of coordinate 1",
                        "kde": {g: coords[modality == g, 0] for g in ("P", "T")}})
            panels.append(row)
            for k in range(2 * n):
                item = k % n
                csv_rows.append({"method": method, "layer": layer, "id": tokens.ids[item], "side": modality[k],
                                 "x": float(coords[k, 0]), "y": float(coords[k, 1]),
                                 **{name: values[item] for name, values in label_columns.items()}})
    with rec.stage("report"):
        from mcollapse.report.lens_figures import map_grid
        from mcollapse.store import atomic_path, write_npz

        map_grid(panels, run_dir / "embedding_map.png", title=f"{cfg.model.name} x {cfg.dataset.name}")
        write_npz(run_dir / "embedding_map.npz", ids=np.array(tokens.ids), **coords_out)
        with atomic_path(run_dir / "embedding_map.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
            writer.writeheader()
            writer.writerows(csv_rows)
    summary.update({"layers": layers, "methods": list(exp.methods), "labels": list(label_columns), "n_items": n})
    rec.write(rows, summary)
    log.info("embedding map: P/T separation of the first coordinate %s",
             ", ".join(f"{k} {v:.2f}" for k, v in summary["separation"].items()))
    return summary
