"""Report sections for the neighbouring lenses and the trained organisms, one table per experiment.

Each row is one run: its model, dataset and seed, then the run's scalar summary fields (the
headline numbers each experiment writes, e.g. the IMA score of `similarity` or the IoU of
`weight_overlap`), then its `source`. Columns are the union over the runs, in the order the
first run wrote them, so a lens that gains a field shows it without a change here.
"""

from __future__ import annotations

from mcollapse.report.paper_tables import _order
from mcollapse.report.runs import RunSet
from mcollapse.report.tables import Table

LENSES = {
    "train_adapter": "Trained projectors: held-out loss, WER / token F1 and GMI",
    "similarity": "Cross-modal similarity and the implicit alignment score (IMA)",
    "logit_lens": "Logit lens: entropy and KL across layers, P vs T",
    "embedding_map": "Embedding maps of P and T",
    "skip": "Computation skipping",
    "weight_overlap": "Modality subnetworks (Wanda masks): IoU of P and T masks",
    "transfer": "Probe transfer across input modality and model",
    "attribute": "Attribute probes and steering",
    "shift": "Representation shift between a base LLM and its descendant",
}
MAX_COLUMNS = 24  # the Markdown stays readable; the run's results.json has every field


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(str(value)) <= 60


def lens_table(runs: RunSet, experiment: str, title: str) -> Table:
    found = sorted(runs.of(experiment), key=_order)
    keys: list[str] = []
    for run in found:
        keys += [k for k, v in run.summary.items() if _scalar(v) and k not in keys]
    columns = ["model", "dataset", "seed", *keys[:MAX_COLUMNS], "source"]
    table = Table(f"lens_{experiment}", title, columns,
                  caption=f"The scalar summary of every `experiment={experiment}` run (results.json has the rest).")
    for run in found:
        table.rows.append({"model": run.model, "dataset": run.dataset, "seed": run.seed,
                           **{k: run.summary.get(k) for k in keys[:MAX_COLUMNS]}, "source": run.source})
    if not found:
        table.missing.append(f"no {experiment} runs")
    return table


def lens_tables(runs: RunSet) -> list[Table]:
    """A table for each lens that has runs (an absent lens is not a gap in the paper's report)."""
    return [lens_table(runs, name, title) for name, title in LENSES.items() if runs.of(name)]
