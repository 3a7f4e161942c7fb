"""Steps shared by the experiments that run the LLM as a decoder (lipschitz, modes, gradproj, gmi).

The encoder runs once per sample (cached adapter sequences); the eigenbasis is computed once per
model x dataset x setting, and the gradient pass once per sample set x target x basis. Each step
caches its output under `paths.cache_dir`, so whichever experiment comes first pays for it (under a
lock: concurrent jobs wanting the same output wait for it rather than compute it too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcollapse.analysis.lipschitz import per_sample_gradient_norms, shared_shift_gradient_norms
from mcollapse.analysis.modes import (
    RHO_NORMALIZATIONS,
    Eigenbasis,
    ModeAlignment,
    eigenbasis,
    load_basis,
    mode_alignment,
    mode_gradient_magnitudes,
    save_basis,
)
from mcollapse.data import select
from mcollapse.data.base import Record
from mcollapse.errors import UserError
from mcollapse.extraction.extract import longer_than
from mcollapse.extraction.sequences import Sequences, adapter_sequences
from mcollapse.models import load_model
from mcollapse.models.base import ModelFamily
from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.pipeline.inputs import Selection
from mcollapse.progress import progress_bar
from mcollapse.report.output import RunRecorder
from mcollapse.store import Unreadable, entry, ids_digest, read_npz, sharded_pass, texts_digest

log = logging.getLogger(__name__)

SPEAKER_FIELD = "speaker_id"
SCORED_IDS_FILE = "scored_ids.txt"  # the scored samples' ids, one a line, in the run dir


@dataclass
class DecoderInputs:
    """The loaded model as a decoder, the cached adapter sequences and each sample's text."""

    family: ModelFamily
    decoder: Decoder
    sequences: Sequences
    texts: dict[str, str]
    dataset: dict
    cache_dir: Path
    records: dict[str, Record] = field(default_factory=dict)  # by id: the fields a scored draw is stratified by
    seed: int = 0
    stratify_by: str | None = None  # the dataset's stratification field, used where records have no speaker
    cut_ids: frozenset[str] = frozenset()  # clips longer than the audio window, which the encoder cut
    keep_cut_clips: bool = False  # False: target=content does not score a cut clip against its full transcript

    def with_text(self, ids: list[str] | None = None) -> list[str]:
        """The ids (default: all usable) that have a transcript/caption to serve as the target y."""
        return [i for i in (ids or self.sequences.ids) if self.texts.get(i, "").strip()]

    def text_sequence(self, sample_id: str) -> np.ndarray:
        """z for text input: the LLM's token embeddings of the sample's transcript/caption."""
        return self.decoder.token_embeddings(self.family.text_token_ids(self.texts[sample_id])).numpy()

    def answer(self, sample_id: str) -> list[int]:
        return self.family.answer_token_ids(self.texts[sample_id])

    @property
    def decoder_key(self) -> str:
        """Keys results that depend on the LLM's weights: the sequences' key (shared by a base model
        and its LoRA variants, whose adapter outputs are the same) plus the merged adapter's hash."""
        return self.sequences.key + llm_suffix(self.family.cfg)


def llm_suffix(model_cfg) -> str:
    if not getattr(model_cfg, "lora", None):
        return ""
    from mcollapse.models.lora import adapter_digest

    return f"+lora-{adapter_digest(model_cfg.lora)}"


def decoder_inputs(cfg, rec: RunRecorder, selection: Selection) -> DecoderInputs:
    cache_dir = Path(cfg.paths.cache_dir)
    with rec.stage("load_model"):
        family = load_model(cfg.model, cache_dir, cfg.device)
    if family.modality == "text":
        raise UserError(f"experiment '{cfg.experiment.name}' needs a multimodal model; '{cfg.model.name}' is text-only")
    rec.extra_meta["checkpoint"] = family.checkpoint
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    with rec.stage("adapter_sequences"):
        sequences = adapter_sequences(family, selection.records, dataset, cache_dir, cfg.strict)
    texts = {r.id: (r.text or "") for r in selection.records}
    cut_ids = longer_than(selection.records, cfg.model.audio_window_s) if family.cuts_long_audio else []
    rec.counts.update({"n_usable": len(sequences.ids), "modal_skipped": sequences.skipped,
                       "n_audio_cut_to_window": len(cut_ids), "sequence_rows_computed": sequences.computed,
                       "n_with_text": sum(1 for i in sequences.ids if texts[i].strip())})
    if not sequences.ids:
        raise UserError(f"no sample of '{cfg.dataset.name}' could be read")
    return DecoderInputs(family, Decoder(family), sequences, texts, dataset, cache_dir,
                         records={r.id: r for r in selection.records}, seed=cfg.seed,
                         stratify_by=cfg.dataset.stratify_by, cut_ids=frozenset(cut_ids),
                         keep_cut_clips=cfg.target.keep_cut_clips)


def scored_ids(inputs: DecoderInputs, target: str, n: int | None, rec: RunRecorder, among=None,
               record: bool = True) -> list[str]:
    """n usable samples that the target can score (content needs a transcript/caption and, unless
    target.keep_cut_clips, a clip the audio window did not cut), optionally only those in `among`,
    drawn by `select`'s seeded rule stratified by speaker where the records have one, else by the
    dataset's field. Ids sort by speaker in LibriSpeech and CREMA-D, so the first n would be a
    handful of speakers. The draw depends only on (ids, seed, n), and a smaller n gives a subset of
    a larger one, so experiments asking for the same n share cached passes.

    With `record`, the chosen ids go to `scored_ids.txt` in the run dir and their digest and
    speaker count into the summary (`record=False` for a secondary draw, such as gmi's L_log set)."""
    ids, skipped = scorable(inputs, target)
    if record:
        rec.counts.update(skipped)
    if among is not None:
        ids = [i for i in ids if i in among]
    chosen = _draw(inputs, ids, n)
    if record:
        speakers = {inputs.records[i].fields.get(SPEAKER_FIELD) for i in chosen} - {None}
        has_speakers = any(SPEAKER_FIELD in r.fields for r in inputs.records.values())
        rec.summary_fields.update({"scored_ids_digest": ids_digest(chosen),
                                   "n_speakers": len(speakers) if has_speakers else None})
        rec.run_dir.mkdir(parents=True, exist_ok=True)
        (rec.run_dir / SCORED_IDS_FILE).write_text("".join(f"{i}\n" for i in chosen))
    return chosen


def _draw(inputs: DecoderInputs, ids: list[str], n: int | None) -> list[str]:
    if n is not None and n < 1:
        raise UserError(f"the number of samples to score must be positive (null: all), got {n}")
    if n is None or n >= len(ids):
        return list(ids)
    candidates = [inputs.records[i] for i in ids]
    stratum = next((name for name in (SPEAKER_FIELD, inputs.stratify_by)
                    if name and any(name in r.fields for r in candidates)), None)
    return [r.id for r in select(candidates, n, stratum, inputs.seed)]


# ---------------------------------------------------------------------------------------------
# The eigenbasis of the pooled adapter output, aligned against text in the same space


@dataclass
class Modes:
    basis: Eigenbasis
    alignment: ModeAlignment
    path: Path
    key: str
    text_ids: list[str]


def scorable(inputs: DecoderInputs, target: str) -> tuple[list[str], dict[str, int]]:
    """The usable samples a target can score, and the counts of those it cannot: under content,
    samples with a transcript/caption whose clip the audio window did not cut (unless
    target.keep_cut_clips); under reference, all. No scorable sample is a one-line error."""
    if target != "content":
        return list(inputs.sequences.ids), {"n_cut_clips_skipped": 0}
    ids = inputs.with_text()
    skipped = {"n_without_text_skipped": len(inputs.sequences.ids) - len(ids)}
    if not ids:
        raise UserError("no sample has a transcript/caption, so target=content has nothing to score "
                        "(target=reference scores the prompt instead)")
    cut = [i for i in ids if i in inputs.cut_ids] if not inputs.keep_cut_clips else []
    skipped["n_cut_clips_skipped"] = len(cut)
    if cut:
        ids = [i for i in ids if i not in inputs.cut_ids]
        if not ids:
            raise UserError(f"all {len(cut)} clips with a transcript are longer than the audio window; "
                            "target.keep_cut_clips=true scores them against their full transcripts anyway")
    return ids, skipped


def modes(inputs: DecoderInputs, rec: RunRecorder, n_modes: int, ms_threshold: float,
          thresholds=(0.1, 0.25, 0.5, 0.75, 0.9), *, rho_normalization: str, fit_ids: list[str] | None = None) -> Modes:
    """Modes of the modal pooled adapter outputs of `fit_ids` (default: all usable samples); rho
    against the pooled token embeddings of the same samples' texts (the LLM's input-embedding
    space, where the adapter output lives). The experiments fit it on the samples of the kind their
    target scores, so a content-target basis never holds clips without a transcript.

    Experiments reach it through shared_modes, which passes the modes group's settings, so they
    all share one cached basis."""
    if rho_normalization not in RHO_NORMALIZATIONS:
        raise UserError(f"modes.rho_normalization must be one of {', '.join(RHO_NORMALIZATIONS)}, "
                        f"got {rho_normalization!r}")
    seqs = inputs.sequences if fit_ids is None else inputs.sequences.subset(fit_ids)
    text_ids = inputs.with_text(list(seqs.ids))
    if len(seqs.ids) < 3:
        raise UserError(f"the eigenbasis needs at least 3 samples, found {len(seqs.ids)}")
    if len(text_ids) < 3:
        raise UserError(f"mode alignment needs texts for at least 3 samples, found {len(text_ids)}")
    found = entry(inputs.cache_dir, "modes",
                  {"kind": "modes", "sequences": inputs.decoder_key, "ids": ids_digest(seqs.ids),
                   "text_ids": ids_digest(text_ids), "texts": texts_digest(inputs.texts[i] for i in text_ids),
                   "n_modes": int(n_modes), "ms_threshold": float(ms_threshold),
                   "thresholds": [float(t) for t in thresholds], "rho_normalization": rho_normalization},
                  suffix=".npz")
    key, path = found.key, found.path
    with rec.stage("modes"):
        basis, alignment = found.read_or_quarantine(path, _read_basis) or (None, None)
        if basis is None:
            with found.lock():
                if not path.is_file():  # else another job saved it while this one waited
                    basis = eigenbasis(seqs.pooled(), n_modes=int(n_modes))
                    text = np.stack([inputs.text_sequence(i).astype(np.float64).mean(axis=0) for i in text_ids])
                    alignment = mode_alignment(basis, text, ms_threshold=float(ms_threshold), thresholds=thresholds,
                                               rho_normalization=rho_normalization)
                    meta = {"model": inputs.family.cfg.name, "dataset": inputs.dataset, "space": "adapter_output",
                            "text": "token embeddings of the transcript/caption, pooled", "n_modal": len(seqs.ids),
                            "n_text": len(text_ids), "sequences_key": seqs.key}
                    save_basis(path, basis, alignment, meta)
        if basis is None:
            basis, alignment, _ = load_basis(path)
    for name in alignment.empty_classes:
        log.warning("no mode is %s (rho_normalization=%s, ms_threshold=%g): controls built on %s modes are empty",
                    name, rho_normalization, ms_threshold, name)
    return Modes(basis, alignment, path, key, text_ids)


def _read_basis(path: Path) -> tuple[Eigenbasis, ModeAlignment]:
    """A cached basis and its alignment; a truncated file or one of another format is `Unreadable`."""
    read_npz(path)  # every array readable, or Unreadable
    try:
        basis, alignment, _ = load_basis(path)
    except UserError as error:
        raise Unreadable(path, str(error)) from None
    if alignment is None:
        raise Unreadable(path, "no mode alignment stored")
    return basis, alignment


def shared_modes(cfg, inputs: DecoderInputs, rec: RunRecorder) -> Modes:
    """The eigenbasis of the modes group's settings, the one every experiment on the modes reads."""
    settings = cfg.modes
    return modes(inputs, rec, settings.n_modes, settings.ms_threshold, tuple(settings.thresholds),
                 rho_normalization=settings.rho_normalization, fit_ids=scorable(inputs, cfg.target.name)[0])


def eigenbasis_for(cfg, inputs: DecoderInputs, rec: RunRecorder):
    """`experiment.basis` (an eigenbasis.npz from a modes run), else the cached basis of this
    model x dataset x setting: (basis, alignment, where it came from)."""
    exp = cfg.experiment
    if exp.basis:
        basis, alignment, meta = load_basis(Path(exp.basis))
        if alignment is None:
            raise UserError(f"eigenbasis {exp.basis} has no MS/TA labels (save it with experiment=modes)")
        if basis.dim != inputs.sequences.arrays[0].shape[1]:
            raise UserError(f"eigenbasis {exp.basis} has {basis.dim} dims, the adapter output has "
                            f"{inputs.sequences.arrays[0].shape[1]}")
        if meta.get("sequences_key") not in (None, inputs.sequences.key):
            log.warning("eigenbasis %s was fitted on other adapter outputs (%s)", exp.basis, meta.get("model"))
        if alignment.rho_normalization != cfg.modes.rho_normalization:
            log.warning("eigenbasis %s splits MS/TA with rho_normalization=%s, not the configured %s; its labels "
                        "are used", exp.basis, alignment.rho_normalization, cfg.modes.rho_normalization)
        return basis, alignment, exp.basis
    found = shared_modes(cfg, inputs, rec)
    return found.basis, found.alignment, str(found.path)


# ---------------------------------------------------------------------------------------------
# One batched LLM-only backward per batch: gradient norms, scores and mode projections


GRADIENT_SHARDS_VERSION = 2  # 2: shards hold shift_norms; older shards lack them and are not reused
GMI_SCORES_VERSION = 1  # bump when what a gmi_scores shard holds changes meaning


@dataclass
class Gradients:
    """Per sample: ||grad_z l||_F, the norm of the gradient w.r.t. a shift shared by all positions
    (the pooled-space L), l itself, #scored tokens, and (with modes) the gradient's magnitude along
    each mode, per position (n, k) and for the mean-over-positions gradient."""

    ids: list[str]
    norms: np.ndarray
    shift_norms: np.ndarray
    scores: np.ndarray
    n_scored: np.ndarray
    lengths: np.ndarray
    mode_magnitudes: np.ndarray | None
    mean_grad_magnitudes: np.ndarray | None
    target: str
    reduction: str


def answers_key(inputs: DecoderInputs, ids: list[str], target) -> dict:
    """Key fields for a pass whose answers are the samples' texts (target=content): an edited
    transcript makes a new pass."""
    return {"texts": texts_digest(inputs.texts[i] for i in ids)} if target.name == "content" else {}


def gradients(inputs: DecoderInputs, rec: RunRecorder, ids: list[str], target, batch_size: int,
              mode_set: Modes | None = None) -> Gradients:
    """Batched, resumable: each batch's results are a durable shard, so an interrupted pass
    continues where it stopped; samples are batched by length to limit padding."""
    seqs = inputs.sequences.subset(ids)
    lengths = np.array([len(a) for a in seqs.arrays])
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    extra = np.array([len(a) for a in answers]) if answers else np.zeros(len(ids), dtype=int)
    order = np.argsort(lengths + extra, kind="stable")
    fields = {"kind": "gradients", "version": GRADIENT_SHARDS_VERSION, "sequences": inputs.decoder_key,
              "ids": ids_digest(ids), "target": target.name, "reduction": target.reduction,
              "batch_size": int(batch_size), "modes": mode_set.key if mode_set else None,
              "dtype": str(inputs.family.dtype)}
    fields.update(answers_key(inputs, ids, target))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    gather = sharded_pass(rec, entry(inputs.cache_dir, "gradients", fields).path, batches, "gradients",
                          lambda rows: _gradient_batch(inputs, seqs, rows, answers, target, mode_set),
                          inputs.cache_dir, fields)
    return Gradients(ids, gather("norms"), gather("shift_norms"), gather("scores"), gather("n_scored"), lengths,
                     gather("mode_magnitudes"), gather("mean_grad_magnitudes"), target.name, target.reduction)


def _gradient_batch(inputs, seqs, rows, answers, target, mode_set) -> dict:
    zs = [seqs.arrays[i] for i in rows]
    batch = compose(inputs.family, [len(z) for z in zs], [answers[i] for i in rows] if answers else None,
                    target.name, target.reduction)
    kept = {}

    def score(z):
        values = inputs.decoder.scores(batch, z)
        kept["scores"] = values.detach()
        return values

    norms, grad = per_sample_gradient_norms(score, pad_sequences(zs), mask=batch.z_mask, return_grad=True)
    out = {"norms": norms.cpu().double().numpy(), "shift_norms": shared_shift_gradient_norms(grad, batch.z_mask),
           "scores": kept["scores"].cpu().double().numpy(), "n_scored": batch.n_scored.numpy()}
    if not np.all(np.isfinite(out["norms"])):
        log.warning("non-finite gradient norms in a batch of %d samples (kept, counted in the stats)", len(rows))
    if mode_set is not None:
        g = grad.cpu().double().numpy()
        mask = batch.z_mask.numpy()
        out["mode_magnitudes"] = mode_gradient_magnitudes(g, mode_set.basis, mask)
        mean_grad = (g * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        out["mean_grad_magnitudes"] = mode_gradient_magnitudes(mean_grad, mode_set.basis)
    return out


# ---------------------------------------------------------------------------------------------
# Scores without gradients, for many (z, y) pairs


def secant_scores(inputs: DecoderInputs, ids: list[str], neighbours: np.ndarray, target,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """l_i(z_i) and l_i(z_j) for each sample i and neighbour j (-1: none), under the run's target:
    sample i's target scored with j's representation. Each sample's own row and its neighbours'
    rows share a forward batch, so their difference carries no batch-to-batch rounding."""
    seqs = inputs.sequences.subset(ids)
    answers = [inputs.answer(i) for i in ids] if target.name == "content" else None
    own = np.full(len(ids), np.nan)
    other = np.full(neighbours.shape, np.nan)
    groups = [[(i, -1, i)] + [(i, c, int(j)) for c, j in enumerate(neighbours[i]) if j >= 0]
              for i in range(len(ids)) if (neighbours[i] >= 0).any()]
    batches: list[list[tuple[int, int, int]]] = []
    for group in groups:  # whole groups per batch, so a sample's rows are never split
        if batches and len(batches[-1]) + len(group) <= batch_size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    with torch.no_grad():
        for part in batches:
            zs = [seqs.arrays[j] for _, _, j in part]
            batch = compose(inputs.family, [len(z) for z in zs], [answers[i] for i, _, _ in part] if answers else None,
                            target.name, target.reduction)
            values = inputs.decoder.scores(batch, pad_sequences(zs)).double().cpu().numpy()
            for (i, c, _), value in zip(part, values):
                if c < 0:
                    own[i] = value
                else:
                    other[i, c] = value
    return own, other



def _pairs_by_representation(candidates: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    """For each z_j, the (sample i, column c) cells of `candidates` that pair y_i with it, in row order."""
    pairs_of: dict[int, list[tuple[int, int]]] = {}
    for i, row in enumerate(candidates):
        for c, j in enumerate(row):
            pairs_of.setdefault(int(j), []).append((i, c))
    return pairs_of


def _representation_scores(decoder: Decoder, z: np.ndarray, answers: list[list[int]], chunk: int) -> np.ndarray:
    """log q(answer | z, prompt) for each answer: z runs through the prompt once and its key/value
    cache scores every answer (Decoder.answer_scores), `chunk` answers at a time."""
    z_t = torch.as_tensor(z, dtype=torch.float32)
    with torch.no_grad():
        return np.concatenate([decoder.answer_scores(z_t, answers[s : s + chunk]).double().cpu().numpy()
                               for s in range(0, len(answers), chunk)])


def candidate_scores(decoder: Decoder, zs: list[np.ndarray], answers: list[list[int]],
                     candidates: np.ndarray, label: str, chunk: int = 64) -> np.ndarray:
    """S[i, c] = log q(y_i | z_{candidates[i, c]}, prompt), target=content summed over tokens,
    grouped by representation (each z_j's prompt pass serves every answer paired with it)."""
    out = np.full(candidates.shape, np.nan)
    pairs_of = _pairs_by_representation(candidates)
    with progress_bar(label, total=len(pairs_of)) as advance:
        for j, pairs in pairs_of.items():
            out[tuple(np.array(pairs).T)] = _representation_scores(decoder, zs[j], [answers[i] for i, _ in pairs],
                                                                   chunk)
            advance(1)
    return out


def cached_candidate_scores(inputs: DecoderInputs, rec: RunRecorder, zs: list[np.ndarray], answers: list[list[int]],
                            candidates: np.ndarray, label: str, key_fields: dict, group: int = 8,
                            chunk: int = 64) -> np.ndarray:
    """candidate_scores as a resumable sharded pass (store kind gmi_scores): `group` representations
    a shard, so an interrupted run continues and a re-run with the same key reads every score back.
    `key_fields` name what the z's and answers are (input kind, sample ids, their texts)."""
    pairs_of = _pairs_by_representation(candidates)
    order = sorted(pairs_of)
    width = max(len(p) for p in pairs_of.values())
    fields = {"kind": "gmi_scores", "version": GMI_SCORES_VERSION, "sequences": inputs.decoder_key,
              "candidates": ids_digest([",".join(map(str, row)) for row in candidates]),
              "dtype": str(inputs.family.dtype), **key_fields}

    def compute(rows):
        block = np.full((len(rows), width), np.nan)
        for r, j in enumerate(rows):
            pairs = pairs_of[order[j]]
            block[r, : len(pairs)] = _representation_scores(inputs.decoder, zs[order[j]],
                                                            [answers[i] for i, _ in pairs], chunk)
        return {"scores": block}

    batches = [np.arange(s, min(s + group, len(order))) for s in range(0, len(order), group)]
    gather = sharded_pass(rec, entry(inputs.cache_dir, "gmi_scores", fields).path, batches, label, compute,
                          inputs.cache_dir, fields)
    by_representation = gather("scores")
    out = np.full(candidates.shape, np.nan)
    for r, j in enumerate(order):
        for k, cell in enumerate(pairs_of[j]):
            out[cell] = by_representation[r, k]
    return out


def batch_size_of(cfg) -> int:
    """The experiment's scoring batch (null: model.batch_size); validate checks both are positive."""
    return cfg.experiment.batch_size or cfg.model.batch_size


def gradient_batch_size(cfg) -> int:
    """The shared gradient pass's batch (null: model.batch_size): part of that pass's cache key."""
    return cfg.gradients.batch_size or cfg.model.batch_size


def lipschitz_summary_entry(cache_dir: Path, model_cfg, dataset: dict, target):
    """The store entry where a lipschitz run leaves its summary for later experiments (W1 x L);
    a run that reads it records its key."""
    return entry(cache_dir, "lipschitz_summary",
                 {"model": f"{model_cfg.name}{llm_suffix(model_cfg)}", "dataset": dataset["name"],
                  "fingerprint": dataset["fingerprint"], "target": target.name, "reduction": target.reduction},
                 suffix=".json")
