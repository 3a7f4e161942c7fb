"""Train the modality projector alone through the frozen LLM (the Ultravox / LLaVA recipe).

1. Three splits of the dataset: `experiment.train_split` and `experiment.dev_split` (named in
   `dataset.splits`) and the evaluated `dataset.parts`. Training must share no speaker and no
   sentence (speech) or no image (vision) with either held-out split; otherwise the run stops.
2. The encoder output (what the encoder hands the projector) of every sample is cached once.
3. The projector is trained on the transcript/caption as the answer to the model's own prompt
   (models.adapter_train: AdamW, warmup + cosine, clipping, early stopping on the dev loss,
   checkpoints kept, resumable after a kill). Only the projector's parameters are trainable.
4. The best projector is evaluated on the held-out split: loss per answer token, greedy WER
   (speech) or token F1 (captions), and the contrastive GMI of `experiment=gmi` (m alternatives).

The run dir gets `projector.safetensors` (the best; `model.projector=<run dir>` loads it),
`checkpoints/step-N/`, `training.png`, and `organism.json`: the training data's fingerprints,
the settings, the device, the held-out metrics and the command that reproduces the weights.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from omegaconf import OmegaConf

from mcollapse import store
from mcollapse.analysis.gmi import gmi_from_scores
from mcollapse.analysis.transcripts import mean_token_f1, normalise_words, word_error_rate
from mcollapse.data import load_records, select, split_config
from mcollapse.errors import UserError
from mcollapse.experiments.gmi import alternatives
from mcollapse.extraction.extract import model_identity
from mcollapse.extraction.sequences import adapter_sequences
from mcollapse.models import load_model
from mcollapse.models.adapter_train import BEST_DIR, CHECKPOINTS_DIR, Example, ProjectorTrainer, evaluate, project
from mcollapse.models.decoder import Decoder
from mcollapse.models.projector import WEIGHTS_FILE, load_projector_file, projector_module
from mcollapse.pipeline.decoder_side import candidate_scores
from mcollapse.pipeline.inputs import recorder
from mcollapse.report.decoder_figures import print_metrics
from mcollapse.report.lora_report import training_figure
from mcollapse.store import ContentDigests, ids_digest

log = logging.getLogger(__name__)

ORGANISM_FILE = "organism.json"
N_CHECK = 16  # held-out samples whose float32 loss is recorded for a shipped projector's load check
SPEAKER_FIELD = "speaker_id"


def split_records(cfg, rec) -> dict[str, tuple[list, dict]]:
    """train / dev / eval records (each a seeded, stratified draw) with their dataset info."""
    exp = cfg.experiment
    out = {}
    with rec.stage("data"):
        for split, dataset_cfg, n in (("train", split_config(cfg.dataset, exp.train_split), exp.n_train),
                                      ("dev", split_config(cfg.dataset, exp.dev_split), exp.n_dev),
                                      ("eval", cfg.dataset, exp.n_eval)):
            memo = store.entry(cfg.paths.cache_dir, "media_digests", {"dataset": str(dataset_cfg.name)},
                               suffix=".json")
            records, info = load_records(dataset_cfg, ContentDigests(memo.path))
            records = [r for r in records if (r.text or "").strip()]
            chosen = select(records, n, cfg.dataset.stratify_by, cfg.seed)
            if not chosen:
                raise UserError(f"split '{dataset_cfg.name}' has no sample with a transcript/caption")
            out[split] = (chosen, {"name": str(dataset_cfg.name), "fingerprint": info["fingerprint"]})
            rec.counts[f"n_{split}_found"] = len(records)
    return out


def overlap(train: list, held_out: list, modality: str) -> dict[str, int]:
    """What a held-out split shares with training: speakers and sentences (speech), images (vision)."""
    shared = {"media": len({r.path.name for r in train} & {r.path.name for r in held_out})}
    speakers = [{r.fields.get(SPEAKER_FIELD) for r in part} - {None} for part in (train, held_out)]
    if all(speakers):
        shared["speakers"] = len(speakers[0] & speakers[1])
    if modality == "audio":
        texts = [{" ".join(normalise_words(r.text)) for r in part} for part in (train, held_out)]
        shared["sentences"] = len(texts[0] & texts[1])
    return shared


def check_disjoint(splits: dict, modality: str) -> dict:
    found = {name: overlap(splits["train"][0], splits[name][0], modality) for name in ("dev", "eval")}
    for name, shared in found.items():
        leaks = {k: v for k, v in shared.items() if v}
        if leaks:
            raise UserError(f"the training split shares {', '.join(f'{v} {k}' for k, v in leaks.items())} with the "
                            f"{name} split: held-out numbers would not be held out")
    return found


SPLIT_SETTINGS = {"train": "experiment.train_split", "dev": "experiment.dev_split", "eval": "dataset.parts"}


def require_usable(name: str, sequences, dataset_name: str) -> None:
    """Every split needs a usable sample: an empty training split cannot train, and an empty dev or
    held-out split would report a loss of 0 that nothing measured."""
    if sequences.ids:
        return
    first = next(iter(sequences.skipped.values()), "none was selected")
    raise UserError(f"the {name} split ({SPLIT_SETTINGS[name]}: '{dataset_name}') has no usable sample: "
                    f"{len(sequences.skipped)} skipped, first {first}")


def best_weights(state_dir: Path) -> Path:
    """The best step's projector file in the training state; gone (a pruned or damaged store) it is
    named, not blamed on model.projector, which this command does not set."""
    path = state_dir / BEST_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"the best projector weights {path} are missing from the training state; delete "
                        f"{state_dir} to train again")
    return path


def examples_of(family, sequences, records) -> list[Example]:
    texts = {r.id: r.text for r in records}
    return [Example(i, x, family.answer_token_ids(texts[i])) for i, x in zip(sequences.ids, sequences.arrays)]


def reproduce_command(cfg) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without a Hydra run (tests, the API)
        overrides = [f"experiment={cfg.experiment.name}", f"model={cfg.model.name}", f"dataset={cfg.dataset.name}"]
    return " ".join(["mcollapse", *overrides])


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def heldout_metrics(cfg, family, decoder, projector, examples: list[Example], records: list,
                    trainer: ProjectorTrainer, rec) -> tuple[dict, list[dict]]:
    """Loss per answer token, greedy WER or token F1, and the contrastive GMI on the held-out split."""
    exp = cfg.experiment
    by_id = {r.id: r for r in records}
    with rec.stage("heldout_loss"):
        loss, accuracy = trainer.evaluate(examples)
    with torch.no_grad():
        zs = []
        for chunk in [examples[i : i + trainer.eval_batch_size] for i in range(0, len(examples),
                                                                                 trainer.eval_batch_size)]:
            z, lengths = project(projector, [e.x for e in chunk], decoder.device)
            zs.extend(z[b, :n].float().cpu() for b, n in enumerate(lengths))
    parts = family.prompt_token_parts()
    with rec.stage("greedy"):
        hypotheses = []
        for start in range(0, len(zs), trainer.eval_batch_size):
            for tokens in decoder.greedy(zs[start : start + trainer.eval_batch_size], parts, exp.max_new_tokens):
                hypotheses.append(family.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    references = [by_id[e.id].text for e in examples]
    metrics = {"heldout_loss_per_token": loss, "heldout_token_accuracy": accuracy, "n_heldout": len(examples)}
    if family.modality == "audio":
        metrics["heldout_wer"] = word_error_rate(references, hypotheses)
    else:
        metrics["heldout_token_f1"] = mean_token_f1(references, hypotheses)
    with rec.stage("gmi"):
        alts = alternatives(len(examples), exp.n_alternatives, cfg.seed)
        candidates = np.concatenate([np.arange(len(examples))[:, None], alts], axis=1)
        scores = candidate_scores(decoder, [z.numpy() for z in zs], [e.answer for e in examples], candidates,
                                  "held-out GMI scores")
        gmi = gmi_from_scores(scores[:, 0], scores[:, 1:], estimator="contrastive", n_boot=2000, seed=cfg.seed)
    metrics.update({"heldout_gmi": gmi.gmi, "heldout_gmi_ci_low": gmi.ci_low, "heldout_gmi_ci_high": gmi.ci_high,
                    "gmi_cap": gmi.cap, "gmi_n_alternatives": int(alts.shape[1])})
    samples = [{"id": e.id, "reference": r, "hypothesis": h} for e, r, h in zip(examples, references, hypotheses)]
    return metrics, samples


def check_record(cfg, family, decoder, projector, examples: list[Example], batch_size: int) -> dict:
    """The float32 loss per answer token on a few held-out samples: what a shipped copy must reproduce."""
    loss, _ = evaluate(decoder, projector, examples, family.prompt_token_parts(), batch_size)
    return {"dataset": str(cfg.dataset.name), "ids": [e.id for e in examples], "loss_per_token": loss,
            "dtype": "float32", "autocast": "none"}


def run(cfg, run_dir: Path) -> dict:
    exp = cfg.experiment
    rec = recorder(cfg, run_dir)
    cache_dir = Path(cfg.paths.cache_dir)
    splits = split_records(cfg, rec)
    disjoint = check_disjoint(splits, cfg.dataset.modality)
    with rec.stage("load_model"):
        family = load_model(cfg.model, cache_dir, cfg.device)
    if family.modality == "text":
        raise UserError(f"train_adapter needs a multimodal model; '{cfg.model.name}' is text-only")
    path, projector = projector_module(family.model, family.adapter_module_names())
    identity = model_identity(family)
    with rec.stage("encoder_outputs"):
        sequences = {name: adapter_sequences(family, records, info, cache_dir, cfg.strict, identity,
                                             role="encoder_output")
                     for name, (records, info) in splits.items()}
    for name, seq in sequences.items():
        rec.counts[f"n_{name}"] = len(seq.ids)
        rec.counts[f"{name}_skipped"] = seq.skipped
        require_usable(name, seq, splits[name][1]["name"])
    examples = {name: examples_of(family, sequences[name], splits[name][0]) for name in splits}
    decoder = Decoder(family)
    settings = {k: exp[k] for k in ("lr", "weight_decay", "warmup_steps", "max_steps", "min_lr_ratio",
                                    "batch_size", "max_grad_norm", "eval_every", "checkpoint_every", "patience",
                                    "autocast")}
    data_key = {name: {"dataset": splits[name][1], "ids": ids_digest(sequences[name].ids)} for name in ("train", "dev")}
    state = store.entry(cache_dir, "projectors", {"model": identity, "projector": path, "data": data_key,
                                                  "settings": settings, "seed": int(cfg.seed)})
    eval_batch = exp.eval_batch_size or cfg.model.batch_size
    trainer = ProjectorTrainer(decoder, projector, OmegaConf.create(settings), family.prompt_token_parts(),
                               state.path, cfg.seed, eval_batch)
    n_parameters = sum(p.numel() for p in trainer.trainable)
    with state.lock(), rec.stage("train"):
        outcome = trainer.fit(examples["train"], examples["dev"], exp.max_minutes)
    best = best_weights(state.path)
    load_projector_file(projector, best)
    projector.eval()
    metrics, samples = heldout_metrics(cfg, family, decoder, projector, examples["eval"], splits["eval"][0],
                                       trainer, rec)

    check = check_record(cfg, family, decoder, projector, examples["eval"][:N_CHECK], eval_batch)
    with rec.stage("report"):
        shutil.copyfile(best, run_dir / WEIGHTS_FILE)
        for step in outcome.checkpoints:
            name = f"step-{step:06d}"
            (run_dir / CHECKPOINTS_DIR / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(state.path / CHECKPOINTS_DIR / name / WEIGHTS_FILE,
                            run_dir / CHECKPOINTS_DIR / name / WEIGHTS_FILE)
        training_figure(outcome.history, outcome.best_step, run_dir / "training.png",
                        f"{cfg.model.name}: projector on {cfg.dataset.name} ({n_parameters:,} parameters)",
                        x="step", held_out="dev")
        store.write_json(run_dir / "heldout_samples.json", samples)
    summary = {"projector_module": path, "n_trainable_parameters": n_parameters,
               "projector_bytes": (run_dir / WEIGHTS_FILE).stat().st_size, "steps": outcome.step,
               "best_step": outcome.best_step, "best_dev_loss": outcome.best_dev_loss,
               "initial_dev_loss": outcome.history[0]["dev_loss"], "stop_reason": outcome.stop_reason,
               "train_seconds": round(outcome.seconds, 1), "resumed_at_step": outcome.resumed_at_step,
               "device": device_description(decoder.device),
               "autocast": str(trainer.autocast).replace("torch.", "") if trainer.autocast else "none",
               **metrics}
    organism = {
        "model": cfg.model.name, "family": cfg.model.family, "projector_module": path,
        "reproduce": reproduce_command(cfg), "settings": settings, "seed": int(cfg.seed),
        "data": {name: {**splits[name][1], "n": len(sequences[name].ids), "ids_digest": ids_digest(sequences[name].ids),
                        "n_speakers": len({r.fields.get(SPEAKER_FIELD) for r in splits[name][0]} - {None})}
                 for name in splits},
        "disjoint_from_train": disjoint, "check": check, "history": outcome.history, "checkpoints": outcome.checkpoints,
        "heldout": metrics, "training": {k: summary[k] for k in ("steps", "best_step", "best_dev_loss",
                                                                 "initial_dev_loss", "stop_reason", "train_seconds",
                                                                 "device", "autocast")},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    store.write_json(run_dir / ORGANISM_FILE, organism)
    rows = [rec.row(path, "-", cfg.seed, name, value) for name, value in metrics.items()
            if isinstance(value, (int, float))]
    rec.write(rows, summary, {"history": outcome.history})
    print_metrics(f"train_adapter: {cfg.model.name} x {cfg.dataset.name}", summary)
    return summary
