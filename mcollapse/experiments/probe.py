"""Linear probes per hook x info type: where along the path speech/image information survives.

Modal rows come from the model fed audio/images; text rows from an LLM fed the transcripts or
captions (the model's own LLM by default), at the LLM hooks. Retention compares the LLM's final
norm with the adapter output, both measured above chance.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mcollapse.analysis.probes import METRICS, ProbeOutcome, ProbeSettings, retention, run_probes
from mcollapse.data.labels import derive_labels
from mcollapse.errors import NothingMeasured, UserError
from mcollapse.pipeline.inputs import modal_and_text, recorder, selected_records
from mcollapse.report.probe_report import print_probe_table, probe_figure

log = logging.getLogger(__name__)


def settings_from(cfg) -> ProbeSettings:
    p = cfg.probe
    if (p.C is None) == (p.weight_decay is None):
        raise UserError("set exactly one of probe.C and probe.weight_decay (probe=reference uses weight_decay)")
    return ProbeSettings(
        C=p.C, weight_decay=p.weight_decay, max_iter=p.max_iter, tol=p.tol,
        train_size=p.train_size, seeds=tuple(p.seeds), min_samples=p.min_samples,
        device="cuda" if cfg.device.startswith("cuda") else "cpu",
    )


def _summarise(outcome: ProbeOutcome) -> dict:
    entry = {"n_classes": outcome.n_classes, "chance": outcome.chance, "majority": outcome.majority,
             "n_used": outcome.n_used, "dropped_classes": outcome.dropped_classes}
    for metric in METRICS:
        entry[f"{metric}_mean"] = outcome.mean(metric)
        entry[f"{metric}_std"] = outcome.std(metric)
    entry["n_train"] = outcome.per_seed[0]["n_train"]
    entry["n_test"] = outcome.per_seed[0]["n_test"]
    entry["converged"] = all(s["converged"] for s in outcome.per_seed)
    return entry


def probe_inputs(cfg, rec, inputs_by_kind, records) -> tuple[list[dict], dict]:
    """Probe every hook of every input kind for every info type; long rows + a nested summary."""
    settings = settings_from(cfg)
    by_id = {r.id: r for r in records}
    rows, summary, skipped = [], {}, {}
    for kind, extraction in inputs_by_kind.items():
        acts = extraction.activations
        recs = [by_id[i] for i in acts.ids]
        labels = derive_labels(recs, list(cfg.dataset.info_types), lexical_rule=cfg.dataset.lexical_rule,
                               top_k=cfg.dataset.lexical_top_k)
        for info_type, column in labels.items():
            if column.skipped_reason:
                skipped[f"{kind}/{info_type}"] = column.skipped_reason
                continue
            with rec.stage(f"probe_{kind}"):
                outcomes = run_probes(acts.vectors, column.values, settings)
            for hook, outcome in outcomes.items():
                if outcome.skipped_reason:
                    skipped[f"{kind}/{info_type}/{hook}"] = outcome.skipped_reason
                    continue
                entry = _summarise(outcome)
                entry["label_rule"] = column.rule
                summary.setdefault(kind, {}).setdefault(info_type, {})[hook] = entry
                for split in outcome.per_seed:
                    for metric in METRICS:
                        rows.append(rec.row(hook, info_type, split["seed"], metric, split[metric], input=kind,
                                            pooling=cfg.hook.pooling, probe=cfg.probe.name,
                                            n_classes=outcome.n_classes, chance=outcome.chance,
                                            n_train=split["n_train"], n_test=split["n_test"]))
    return rows, {"probes": summary, "skipped": skipped}


def add_retention(summary: dict, llm_final: str = "llm_final", adapter: str = "adapter_output") -> dict:
    out = {}
    for info_type, hooks in summary.get("probes", {}).get("modal", {}).items():
        if llm_final in hooks and adapter in hooks:
            out[info_type] = retention(hooks[llm_final]["accuracy_mean"], hooks[adapter]["accuracy_mean"],
                                       hooks[adapter]["chance"])
    summary["retention_adapter_to_final"] = out
    return summary


def run(cfg, run_dir: Path) -> dict:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    extracted = modal_and_text(cfg, rec, selection)
    inputs = {"modal": extracted.modal}
    if extracted.text is not None:
        inputs["text"] = extracted.text
    rows, summary = probe_inputs(cfg, rec, inputs, selection.records)
    summary = add_retention(summary)
    summary["hooks"] = [t.name for t in extracted.modal.targets]
    summary["probe_preset"] = cfg.probe.name
    summary["pooling"] = cfg.hook.pooling
    for kind, hooks in summary["probes"].items():
        for info_type, per_hook in hooks.items():
            for hook, entry in per_hook.items():
                if not entry["converged"]:
                    log.warning("probe %s/%s/%s did not converge in %d iterations", kind, info_type, hook,
                                cfg.probe.max_iter)
    if not summary["probes"].get("modal"):  # a text baseline alone measures nothing of the model's modality
        rec.write(rows, summary)  # the skip reasons are the result
        raise NothingMeasured(_nothing_measured(summary["skipped"], extracted.modal, run_dir))
    with rec.stage("report"):
        probe_figure(summary, run_dir / "probe_accuracy.png", title=f"{cfg.model.name} x {cfg.dataset.name}")
    rec.write(rows, summary)
    print_probe_table(summary, title=f"probe accuracy: {cfg.model.name} x {cfg.dataset.name}")
    log.info("results in %s", run_dir)
    return summary


def _nothing_measured(skipped: dict, modal, run_dir: Path) -> str:
    """One line on why no probe ran: the samples that never reached a probe, else the first skip."""
    n_rows = len(modal.activations.ids)
    if modal.skipped and n_rows < len(modal.skipped):
        sample, reason = next(iter(modal.skipped.items()))
        why = f"{len(modal.skipped)} samples skipped, {n_rows} extracted (e.g. {sample}: {reason})"
    elif skipped:
        probe, reason = next(iter(skipped.items()))
        why = f"{len(skipped)} probes skipped (e.g. {probe}: {reason})"
    else:
        why = "the dataset has none of the configured info types"
    return f"nothing measured: {why}; results in {run_dir}"
