"""The skeleton of the experiments that edit the decoder's input along eigenmodes (ablation, msswap):
select the samples, load the eigenbasis, then one cached, sharded pass over batches of scored samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcollapse.analysis.modes import Eigenbasis, ModeAlignment
from mcollapse.pipeline.decoder_side import DecoderInputs, answers_key, batch_size_of, decoder_inputs, eigenbasis_for
from mcollapse.pipeline.inputs import Selection, recorder, selected_records
from mcollapse.report.output import RunRecorder
from mcollapse.store import entry, ids_digest, sharded_pass
from mcollapse.store.atomic import write_json, write_npz
from mcollapse.store.checked import read_npz
from mcollapse.store.entry import read_or_quarantine


@dataclass
class ModeEditRun:
    """What a mode-editing experiment starts from: the run, its samples, their decoder inputs and the basis."""

    rec: RunRecorder
    selection: Selection
    inputs: DecoderInputs
    basis: Eigenbasis
    alignment: ModeAlignment
    basis_source: str  # where the basis came from, recorded in the summary and the cache key


def start_mode_edits(cfg, run_dir: Path) -> ModeEditRun:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    inputs = decoder_inputs(cfg, rec, selection)
    basis, alignment, basis_source = eigenbasis_for(cfg, inputs, rec)
    return ModeEditRun(rec, selection, inputs, basis, alignment, basis_source)


def cached_pass(cfg, run: ModeEditRun, kind: str, ids: list[str], batches, compute, **key_fields):
    """`compute(rows)` over `batches` as a resumable sharded pass, a store entry of `kind`; the key
    covers the sequences, the scored samples (and their texts under target=content), the basis, the
    target, the batching and the dtype, plus `key_fields` (what else the experiment's numbers depend
    on). Returns the pass's `gather(name)`."""
    inputs = run.inputs
    fields = {"kind": kind, "sequences": inputs.decoder_key, "ids": ids_digest(ids), "basis": run.basis_source,
              "target": cfg.target.name, "reduction": cfg.target.reduction, "batch": batch_size_of(cfg),
              "dtype": str(inputs.family.dtype), **key_fields, **answers_key(inputs, ids, cfg.target)}
    return sharded_pass(run.rec, entry(inputs.cache_dir, kind, fields).path, batches, kind, compute,
                        inputs.cache_dir, fields)


CONSTANTS_FILE = "constants.npz"


def cached_constants(cfg, run: ModeEditRun, ids: list[str], plan_key: str, settings: dict, fit) -> dict[str, dict]:
    """The optimal edit's fitted constants as a store entry (kind ablation, part optimal_constants):
    `fit()` -> {subspace: {constant, curve}} runs once under the entry's lock; a re-run or a
    resumed run reads them back, an unreadable copy is quarantined and fitted again."""
    inputs = run.inputs
    fields = {"kind": "ablation", "part": "optimal_constants", "sequences": inputs.decoder_key,
              "ids": ids_digest(ids), "basis": run.basis_source, "target": cfg.target.name,
              "reduction": cfg.target.reduction, "plan": plan_key, "settings": settings,
              "dtype": str(inputs.family.dtype), **answers_key(inputs, ids, cfg.target)}
    found = entry(inputs.cache_dir, "ablation", fields)
    path = found.path / CONSTANTS_FILE

    def unpack(arrays: dict) -> dict[str, dict]:
        names = sorted({key.split("__")[0] for key in arrays})
        return {n: {"constant": arrays[f"{n}__constant"], "curve": arrays[f"{n}__curve"].tolist()} for n in names}

    def read():  # a broken copy is quarantined (None): fitted again
        found_arrays = read_or_quarantine(inputs.cache_dir, path, read_npz)
        return None if found_arrays is None else unpack(found_arrays)

    if (done := read()) is not None:
        return done
    with run.rec.stage("optimal_fit"), found.lock():
        if (done := read()) is not None:  # another job fitted them while this one waited
            return done
        arrays = {}
        for name, f in fit().items():
            arrays[f"{name}__constant"] = np.asarray(f["constant"])
            arrays[f"{name}__curve"] = np.asarray(f["curve"], dtype=np.float64)
        write_json(found.path / "entry.json", {"key": found.key, "fields": fields}, default=str)
        write_npz(path, **arrays)
    return unpack(arrays)
