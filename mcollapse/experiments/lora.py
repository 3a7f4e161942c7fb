"""LoRA on the LLM with a forced-choice objective: does training the decoder to use a label make it
accessible, and only that label? (paper 6.1, Table 3)

1. The labelled samples are split into train / validation / test parts with whole groups
   (speakers) held out, and the split is saved with the run.
2. The base model answers the test part (task accuracy), and the test part is extracted through
   it with the usual neutral prompt.
3. LoRA (LLM only) is trained on the train part, on cached adapter outputs, with early stopping on
   the validation loss; the best epoch's adapter is reloaded, evaluated on the test part, and saved
   in the run dir (`adapter/`, usable by every experiment as `model.lora=<dir>`).
4. The test part is extracted again through the model loaded with that adapter, and both
   extractions are probed with the same code and settings as experiment=probe: the targeted label
   against the others, with the encoder and adapter outputs checked to be unchanged.

`experiment.objective=text` trains the same LoRA on the transcripts/captions instead (the control
that should leave the label inaccessible).
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mcollapse import store
from mcollapse.analysis.answers import task_scores
from mcollapse.analysis.splits import group_split
from mcollapse.data.labels import derive_labels
from mcollapse.errors import UserError
from mcollapse.experiments.probe import probe_inputs
from mcollapse.extraction.extract import extract_modal, model_identity
from mcollapse.extraction.sequences import adapter_sequences
from mcollapse.models import load_model
from mcollapse.models.decoder import Decoder
from mcollapse.models.lora import attach
from mcollapse.models.lora_train import Example, Trainer, answer_loss
from mcollapse.pipeline.inputs import recorder, selected_records
from mcollapse.pipeline.lora_task import answer_tokens, evaluate, task_prompt
from mcollapse.report.lora_report import confusion_figure, print_lora_table, probe_change_figure, training_figure
from mcollapse.runtime import release_memory

log = logging.getLogger(__name__)

OBJECTIVES = ("task", "text")
UPSTREAM_HOOKS = ("encoder_output", "adapter_output")


def _column(cfg, records, info_type: str, purpose: str) -> list:
    column = derive_labels(records, [info_type], lexical_rule=cfg.dataset.lexical_rule,
                           top_k=cfg.dataset.lexical_top_k)[info_type]
    if column.skipped_reason:
        raise UserError(f"lora cannot use '{info_type}' as {purpose} on '{cfg.dataset.name}': {column.skipped_reason}")
    return column.values


def labelled_split(cfg, records, rec) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """Gold label per labelled id, the group-disjoint split, and each id's group."""
    exp = cfg.experiment
    values = _column(cfg, records, exp.label, "the task label")
    groups = _column(cfg, records, exp.group_by, "the split grouping") if exp.group_by else \
        [r.id for r in records]
    gold, group_of = {}, {}
    for record, value, group in zip(records, values, groups):
        if value is not None and group is not None:
            gold[record.id], group_of[record.id] = value, group
    rec.counts["n_without_label_or_group"] = len(records) - len(gold)
    if len(set(gold.values())) < 2:
        raise UserError(f"label '{exp.label}' has fewer than 2 classes among the selected samples")
    ids = list(gold)
    try:
        split = group_split(ids, [group_of[i] for i in ids], exp.val, exp.test, cfg.seed)
    except ValueError as err:
        raise UserError(f"cannot split by {exp.group_by or 'sample'}: {err}") from None
    return gold, split, group_of


def _write_split(path: Path, cfg, split: dict, group_of: dict, gold: dict) -> None:
    exp = cfg.experiment
    store.write_json(path, {
        "seed": cfg.seed, "group_by": exp.group_by, "val_share": exp.val, "test_share": exp.test,
        "label": exp.label,
        **{part: {"ids": ids, "groups": sorted({group_of[i] for i in ids}),
                  "class_counts": {c: sum(gold[i] == c for i in ids) for c in sorted(set(gold.values()))}}
           for part, ids in split.items()},
    })


def _examples(ids, arrays_by_id, answers_by_id) -> list[Example]:
    return [Example(i, arrays_by_id[i], answers_by_id[i]) for i in ids if i in answers_by_id]


def _task_summary(results: list[dict], choices: list[str]) -> dict:
    gold = [r["gold"] for r in results]
    strict = task_scores(gold, [r["strict"] for r in results], choices)
    lenient = task_scores(gold, [r["lenient"] for r in results], choices)
    likelihood = task_scores(gold, [r["likelihood"] for r in results], choices)
    return {"accuracy": strict["accuracy"], "parse_rate": strict["answered"],
            "lenient_accuracy": lenient["accuracy"], "lenient_match_rate": lenient["answered"],
            "likelihood_accuracy": likelihood["accuracy"], "n": strict["n"],
            "per_class_accuracy": strict["per_class_accuracy"], "confusion": strict["confusion"],
            "likelihood_confusion": likelihood["confusion"]}


def _write_predictions(path: Path, ids: list[str], by_condition: dict[str, list[dict]]) -> None:
    columns = ["id", "condition"] + list(next(iter(by_condition.values()))[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for condition, results in by_condition.items():
            for sample_id, result in zip(ids, results):
                writer.writerow({"id": sample_id, "condition": condition, **result})


def _probe_changes(probes: dict, label: str) -> dict:
    """info type -> hook -> base / lora accuracy and the change; `targeted` marks the trained label."""
    changes = {}
    base, tuned = probes["base"].get("modal", {}), probes["lora"].get("modal", {})
    for info_type in base:
        for hook, entry in base[info_type].items():
            after = tuned.get(info_type, {}).get(hook)
            if after is None:
                continue
            changes.setdefault(info_type, {})[hook] = {
                "base": entry["accuracy_mean"], "base_std": entry["accuracy_std"],
                "lora": after["accuracy_mean"], "lora_std": after["accuracy_std"],
                "delta": after["accuracy_mean"] - entry["accuracy_mean"], "chance": entry["chance"],
                "targeted": info_type == label}
    return changes


def _upstream_difference(base, tuned) -> dict[str, float]:
    """Largest |difference| of the encoder/adapter vectors between the two extractions (LoRA is
    LLM-only, so anything but 0 means the comparison is not what it claims)."""
    out = {}
    for hook in UPSTREAM_HOOKS:
        if hook in base.activations.vectors and hook in tuned.activations.vectors:
            if base.activations.ids != tuned.activations.ids:
                raise RuntimeError("the two test-split extractions hold different samples")
            out[hook] = float(np.max(np.abs(base.activations.vectors[hook] - tuned.activations.vectors[hook])))
    return out


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    if exp.objective not in OBJECTIVES:
        raise UserError(f"experiment.objective '{exp.objective}' is not one of {', '.join(OBJECTIVES)}")
    label = exp.label
    rec = recorder(cfg, run_dir)
    cache_dir = Path(cfg.paths.cache_dir)
    selection = selected_records(cfg, rec)
    gold, split, group_of = labelled_split(cfg, selection.records, rec)  # fails before the model loads
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    with rec.stage("load_model"):
        family = load_model(cfg.model, cache_dir, cfg.device)
    if family.modality == "text":
        raise UserError(f"model '{cfg.model.name}' is text-only: the LoRA task needs audio or image input")
    precision = str(family.dtype).removeprefix("torch.")  # bfloat16 on GPU, float32 on CPU (model.dtype=auto)
    with rec.stage("adapter_sequences"):
        sequences = adapter_sequences(family, selection.records, dataset, cache_dir, cfg.strict)
    rec.counts.update({"n_usable": len(sequences.ids), "n_unreadable": len(sequences.skipped)})
    readable = set(sequences.ids)  # unreadable clips leave their part; groups stay disjoint
    split = {part: [i for i in ids if i in readable] for part, ids in split.items()}
    gold = {i: value for i, value in gold.items() if i in readable}
    by_id = {r.id: r for r in selection.records}
    _write_split(run_dir / "split.json", cfg, split, group_of, gold)
    choices = sorted(set(gold.values()))
    test_ids = split["test"]
    test_records = [by_id[i] for i in test_ids]
    arrays = dict(zip(sequences.ids, sequences.arrays))
    eval_batch = exp.eval_batch_size or family.cfg.batch_size

    with rec.stage("extract_test_base"):
        base_extraction = extract_modal(family, test_records, dataset, cfg.hook, cache_dir, cfg.strict,
                                        cfg.flush_every)
    task_parts = family.prompt_token_parts(*reversed(task_prompt(exp, family.modality, label, choices)))
    decoder = Decoder(family)
    test_arrays, test_gold = [arrays[i] for i in test_ids], [gold[i] for i in test_ids]
    with rec.stage("evaluate_base"):
        base_results = evaluate(decoder, test_arrays, test_gold, choices, task_parts, eval_batch,
                                exp.max_new_tokens)

    if exp.objective == "task":
        train_parts, answers = task_parts, {i: answer_tokens(family, gold[i]) for i in gold}
    else:
        train_parts = family.prompt_token_parts()
        answers = {i: family.answer_token_ids(by_id[i].text) for i in gold if (by_id[i].text or "").strip()}
    train = _examples(split["train"], arrays, answers)
    val = _examples(split["val"], arrays, answers)
    rec.counts.update({"n_train": len(train), "n_val": len(val), "n_test": len(test_ids),
                       "n_train_val_without_text": len(split["train"]) + len(split["val"]) - len(train) - len(val)})
    if not train or not val:
        raise UserError(f"objective '{exp.objective}' leaves no training or validation samples")
    peft_model = attach(family.model, cfg.lora)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    state = store.entry(cache_dir, "lora", {
        **model_identity(family), "dataset": dataset, "sequences": sequences.key, "kind": "lora",
        "split": {p: split[p] for p in ("train", "val")}, "objective": exp.objective, "label": label,
        "prompt": train_parts, "lora": OmegaConf.to_container(cfg.lora, resolve=True), "seed": cfg.seed})
    trainer = Trainer(decoder, peft_model, cfg.lora, train_parts, state.path, cfg.seed,
                      eval_batch)
    with rec.stage("train"):
        outcome = trainer.fit(train, val)
    trainer.load_best()
    reloaded_val_loss, _ = answer_loss(decoder, val, train_parts, eval_batch)
    with rec.stage("evaluate_lora"):
        lora_results = evaluate(decoder, test_arrays, test_gold, choices, task_parts, eval_batch,
                                exp.max_new_tokens)
    adapter_dir = run_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(trainer.best_dir, adapter_dir)
    del decoder, peft_model, family
    release_memory()

    with rec.stage("load_lora_model"):
        tuned_family = load_model(OmegaConf.merge(cfg.model, {"lora": str(adapter_dir)}), cache_dir, cfg.device)
    with rec.stage("extract_test_lora"):
        tuned_extraction = extract_modal(tuned_family, test_records, dataset, cfg.hook, cache_dir,
                                         cfg.strict, cfg.flush_every)
    del tuned_family
    release_memory()
    rows, probes, probe_skips = [], {}, {}
    for condition, extraction in (("base", base_extraction), ("lora", tuned_extraction)):
        condition_rows, probe_summary = probe_inputs(cfg, rec, {"modal": extraction}, test_records)
        rows += [{**row, "condition": condition} for row in condition_rows]
        probes[condition] = probe_summary["probes"]
        probe_skips[condition] = probe_summary["skipped"]

    task = {"base": _task_summary(base_results, choices), "lora": _task_summary(lora_results, choices)}
    task["delta_accuracy"] = task["lora"]["accuracy"] - task["base"]["accuracy"]
    task["delta_likelihood_accuracy"] = task["lora"]["likelihood_accuracy"] - task["base"]["likelihood_accuracy"]
    settings = cfg.lora
    summary = {
        "label": label, "objective": exp.objective, "choices": choices, "group_by": exp.group_by,
        "split": {p: {"n": len(ids), "groups": len({group_of[i] for i in ids})} for p, ids in split.items()},
        "task": task,
        "training": {"preset": settings.name, "r": settings.r, "alpha": settings.alpha,
                     "dropout": settings.dropout, "target_modules": list(settings.target_modules),
                     "last_layers": settings.last_layers, "trainable_parameters": n_trainable,
                     "precision": precision,
                     "epochs_run": len(outcome.history), "best_epoch": outcome.best_epoch,
                     "best_val_loss": outcome.best_val_loss, "reloaded_best_val_loss": reloaded_val_loss,
                     "stopped_early": len(outcome.history) < settings.epochs, "optimizer_steps": outcome.steps,
                     "resumed_at_epoch": outcome.resumed_at_epoch, "history": outcome.history},
        "probes": probes, "probe_skipped": probe_skips,
        "probe_changes": _probe_changes(probes, label),
        "upstream_max_abs_difference": _upstream_difference(base_extraction, tuned_extraction),
        "adapter": "adapter",
    }
    for condition in ("base", "lora"):
        for metric in ("accuracy", "lenient_accuracy", "parse_rate", "likelihood_accuracy"):
            rows.append(rec.row("task", label, cfg.seed, f"task_{metric}", task[condition][metric],
                                condition=condition, objective=exp.objective, n=task[condition]["n"]))
    for record in outcome.history:
        for metric in ("train_loss", "val_loss", "val_token_accuracy"):
            rows.append(rec.row("task", label, cfg.seed, metric, record[metric], condition="lora",
                                epoch=record["epoch"], objective=exp.objective))
    _write_predictions(run_dir / "predictions.csv", test_ids, {"base": base_results, "lora": lora_results})
    title = f"{cfg.model.name} x {cfg.dataset.name}: {exp.objective} LoRA on {label}"
    with rec.stage("report"):
        confusion_figure(task, run_dir / "confusion.png", title)
        training_figure(outcome.history, outcome.best_epoch, run_dir / "training.png", title)
        probe_change_figure(summary["probe_changes"], run_dir / "probe_changes.png", title)
    rec.write(rows, summary)
    print_lora_table(summary, title)
    log.info("results in %s; adapter in %s", run_dir, adapter_dir)
    return summary
