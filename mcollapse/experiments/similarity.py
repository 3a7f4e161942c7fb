"""Cross-modal cosine similarity of P (media) and T (text) representations at every LLM layer.

Per layer: P-T, P-P and T-T cosines (pairings all | matched; pooled vectors or a reduction of
the token x token cosines), `intra` (first half of the items against the second half), the
same item at layers l and l + k, token norms, a noise baseline (P replaced by uniform noise of the
same shape and scale), and the implicit alignment score IMA(l) = cos(P at layer 0, T at layer l)
with its mean over layers, for the run's model and every model or projector in `compare`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mcollapse.analysis import similarity as sim
from mcollapse.errors import UserError
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.pipeline.layer_inputs import comparison_model, layer_inputs

log = logging.getLogger(__name__)


def _check(exp) -> None:
    for value in exp.pairings:
        if value not in sim.PAIRINGS:
            raise UserError(f"experiment.pairings: '{value}' is not one of {', '.join(sim.PAIRINGS)}")
    for value in exp.poolings:
        if value not in sim.POOLINGS:
            raise UserError(f"experiment.poolings: '{value}' is not one of {', '.join(sim.POOLINGS)}")
    if any(int(k) < 1 for k in exp.steps):
        raise UserError("experiment.steps must be positive layer offsets")


MIN_ITEMS = 2


def _enough_items(n: int, which: str) -> None:
    """Similarities between items need two of them: with one, every spread and the intra halves are
    NaN, and the run would end as if it had measured something."""
    if n < MIN_ITEMS:
        raise UserError(f"similarity needs at least {MIN_ITEMS} samples, {n} {which}: raise dataset.max_samples")


def _pair_matrices(a_pooled, b_pooled, a_tokens, b_tokens, poolings) -> dict[str, np.ndarray]:
    out = {}
    if "pooled" in poolings:
        out["pooled"] = sim.cosine_matrix(a_pooled, b_pooled)
    reductions = [p for p in poolings if p != "pooled"]
    if reductions:
        out.update(sim.token_pair_matrices(a_tokens, b_tokens, reductions))
    return out


def layer_rows(tokens, exp, rng) -> tuple[list[tuple], dict]:
    """(family, layer, pairing, pooling, mean, std, n_pairs) tuples for every layer, and the norms."""
    out, norms = [], {}
    n = len(tokens.ids)
    first, second = sim.halves(n)
    for layer in range(tokens.n_layers):
        pooled = {s: tokens.pooled[s][:, layer] for s in ("P", "T")}
        toks = {s: tokens.token_lists(s, layer) for s in ("P", "T")}
        noise = sim.uniform_noise_like(toks["P"], rng) if exp.noise else None
        mats = {
            "P-T": _pair_matrices(pooled["P"], pooled["T"], toks["P"], toks["T"], exp.poolings),
            "P-P": _pair_matrices(pooled["P"], pooled["P"], toks["P"], toks["P"], exp.poolings),
            "T-T": _pair_matrices(pooled["T"], pooled["T"], toks["T"], toks["T"], exp.poolings),
        }
        if noise is not None:
            noise_pooled = np.stack([t.mean(axis=0) for t in noise])
            mats["noise-T"] = _pair_matrices(noise_pooled, pooled["T"], noise, toks["T"], exp.poolings)
        for family, by_pooling in mats.items():
            same = family in ("P-P", "T-T")
            for pooling, matrix in by_pooling.items():
                for pairing in exp.pairings:
                    if same and pairing == "matched":
                        continue  # an item against itself: trivially 1
                    out.append((family, layer, pairing, pooling, *sim.pair_summary(matrix, pairing, same)))
                    if same and n >= 2:
                        block = matrix[first, second]
                        out.append((f"intra-{family[0]}", layer, pairing, pooling, *sim.pair_summary(block, pairing)))
                if same and n >= 2 and "matched" in exp.pairings:
                    out.append((f"intra-{family[0]}", layer, "matched", pooling,
                                *sim.pair_summary(matrix[first, second], "matched")))
        for side in ("P", "T"):
            norms.setdefault(side, []).append(sim.norms(pooled[side], tokens.tokens[side][:, layer]))
        for k in exp.steps:
            if layer + int(k) >= tokens.n_layers:
                continue
            later = layer + int(k)
            for side in ("P", "T"):
                values = sim.matched_step_cosine(pooled[side], tokens.pooled[side][:, later])
                out.append((f"step{k}-{side}", layer, "matched", "pooled", float(values.mean()), float(values.std()),
                            len(values)))
                later_toks = tokens.token_lists(side, later)
                for reduction in [p for p in exp.poolings if p != "pooled"]:
                    values = sim.token_step_cosine(toks[side], later_toks, reduction)
                    out.append((f"step{k}-{side}", layer, "matched", reduction, float(values.mean()),
                                float(values.std()), len(values)))
    return out, norms


def ima_scores(tokens, pairings) -> dict[str, dict]:
    out = {}
    for pairing in pairings:
        curve = sim.ima_curve(tokens.pooled["P"][:, 0], tokens.pooled["T"], pairing)
        out[pairing] = {"curve": curve.tolist(), "score": float(np.mean(curve))}
    return out


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    _check(exp)
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    _enough_items(len(selection.records), "selected")
    entries = [(str(cfg.model.name), None)] + [comparison_model(cfg, spec) for spec in exp.compare]
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise UserError(f"experiment.compare: names must differ from each other and the run's model ({names})")
    rows, summary, curves = [], {"ima": {}, "layers": {}}, {}
    for n_entry, (name, model_cfg) in enumerate(entries):
        inputs = layer_inputs(cfg, rec, selection, model_cfg=model_cfg, name=name)
        tokens = inputs.tokens
        _enough_items(len(tokens.ids), f"usable for '{name}' (the others were skipped)")
        scores = ima_scores(tokens, exp.pairings)
        summary["ima"][name] = {p: v["score"] for p, v in scores.items()}
        curves[name] = scores
        for pairing, value in scores.items():
            rows.append(rec.row("all_layers", "ima", cfg.seed, f"ima_score_{pairing}", value["score"], variant=name))
            for layer, v in enumerate(value["curve"]):
                rows.append(rec.row(f"layer_{layer}", "ima", cfg.seed, f"ima_{pairing}", v, variant=name,
                                    layer=layer))
        if n_entry == 0:  # the full lens on the run's model; the comparison entries give their IMA curve
            with rec.stage("similarity"):
                stats, norms = layer_rows(tokens, exp, np.random.default_rng(int(cfg.seed)))
            for family, layer, pairing, pooling, mean, std, n_pairs in stats:
                for metric, value in (("cos_mean", mean), ("cos_std", std)):
                    rows.append(rec.row(f"layer_{layer}", family, cfg.seed, metric, value, variant=name, layer=layer,
                                        pairing=pairing, pooling=pooling, n_pairs=n_pairs))
            for side, per_layer in norms.items():
                for layer, values in enumerate(per_layer):
                    for metric, value in values.items():
                        rows.append(rec.row(f"layer_{layer}", f"norm-{side}", cfg.seed, metric, value, variant=name,
                                            layer=layer))
            summary["layers"] = _layer_summary(stats)
            summary["n_layers"] = tokens.n_layers
            summary["n_items"] = len(tokens.ids)
    summary["ima_definition"] = "mean over layers l=0..L of cos(P pooled at layer 0, T pooled at layer l)"
    with rec.stage("report"):
        from mcollapse.report.lens_figures import ima_figure, similarity_figure

        ima_figure(curves, run_dir / "ima_score.png", title=f"IMA(l): {cfg.dataset.name}")
        similarity_figure(rows, run_dir / "similarity_layers.png", title=f"{cfg.model.name} x {cfg.dataset.name}")
    rec.write(rows, summary, details={"ima_curves": curves})
    for name, scores in summary["ima"].items():
        log.info("IMA score %s: %s", name, ", ".join(f"{p} {v:.4f}" for p, v in scores.items()))
    return summary


def _layer_summary(stats) -> dict:
    """P-T cosine (pooled vectors) per pairing, and its noise baseline, as lists over layers."""
    out = {}
    for family, layer, pairing, pooling, mean, _std, _n in stats:
        if pooling == "pooled" and family in ("P-T", "noise-T"):
            out.setdefault(f"{family}_{pairing}", []).append(mean)
    return out
