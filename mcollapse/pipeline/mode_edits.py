"""The skeleton of the experiments that edit the decoder's input along eigenmodes (ablation, msswap):
select the samples, load the eigenbasis, then one cached, sharded pass over batches of scored samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mcollapse.analysis.modes import Eigenbasis, ModeAlignment
from mcollapse.extraction.cache import cache_key
from mcollapse.pipeline.decoder_side import (
    DecoderInputs,
    batch_size_of,
    decoder_inputs,
    eigenbasis_for,
    ids_digest,
    sharded_pass,
)
from mcollapse.pipeline.inputs import Selection, recorder, selected_records
from mcollapse.report.output import RunRecorder


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
    """`compute(rows)` over `batches` as a resumable sharded pass, cached under `<cache>/<kind>/<key>`; the key
    covers the sequences, the scored samples, the basis, the target, the batching and the dtype, plus
    `key_fields` (what else the experiment's numbers depend on). Returns the pass's `gather(name)`."""
    key = cache_key({"kind": kind, "sequences": run.inputs.decoder_key, "ids": ids_digest(ids),
                     "basis": run.basis_source, "target": cfg.target.name, "reduction": cfg.target.reduction,
                     "batch": batch_size_of(cfg), "dtype": str(run.inputs.family.dtype), **key_fields})
    return sharded_pass(run.rec, run.inputs.cache_dir / kind / key, batches, kind, compute)
