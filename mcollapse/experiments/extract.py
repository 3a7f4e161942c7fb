"""Fill the activation cache alone (modal and, if configured, text) so later runs only analyse."""

from __future__ import annotations

from pathlib import Path

from mcollapse.pipeline.inputs import modal_and_text, recorder, selected_records


def run(cfg, run_dir: Path) -> dict:
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    extracted = modal_and_text(cfg, rec, selection)
    summary = {"modal": {"key": extracted.modal.key, "n": len(extracted.modal.activations.ids),
                         "hooks": {h: list(v.shape) for h, v in extracted.modal.activations.vectors.items()}}}
    if extracted.text is not None:
        summary["text"] = {"key": extracted.text.key, "n": len(extracted.text.activations.ids)}
    rows = [rec.row(hook, "-", None, "n_rows", shape[0], input="modal")
            for hook, shape in summary["modal"]["hooks"].items()]
    rec.write(rows, summary)
    return summary
