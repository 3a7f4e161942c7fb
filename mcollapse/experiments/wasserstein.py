"""W1 between the modal and the text cloud at one LLM hook, with the text-vs-text floor.

Both clouds come from the same cached extraction the probes use: the model fed audio/images, and
the same LLM fed the transcripts/captions where the media stood. The paper's bound needs the
text side from the same decoder and space, so a separate text model is refused here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mcollapse.analysis.wasserstein import fit_pca_basis, w1_between  # noqa: E402
from mcollapse.errors import UserError  # noqa: E402
from mcollapse.models.roles import hook_name  # noqa: E402
from mcollapse.pipeline.decoder_side import lipschitz_summary_entry  # noqa: E402
from mcollapse.pipeline.inputs import modal_and_text, recorder, selected_records  # noqa: E402

log = logging.getLogger(__name__)


def _clouds(cfg, extracted) -> tuple[str, np.ndarray, np.ndarray]:
    hook = hook_name(cfg.experiment.hook, cfg.hook.llm_layer)
    if extracted.text is None:
        raise UserError("wasserstein needs the text side: set experiment.text.source=self")
    modal, text = extracted.modal.activations.vectors, extracted.text.activations.vectors
    if hook not in modal or hook not in text:
        raise UserError(f"hook '{hook}' is not among the extracted LLM hooks {sorted(text)}")
    return hook, modal[hook], text[hook]


def _figure(a: np.ndarray, b: np.ndarray, result, hook: str, path: Path, title: str) -> None:
    """The two clouds on the union's top two principal directions, with the W1 figures."""
    mean, components, ratios = fit_pca_basis(a, b, 2)
    pa, pb = (a - mean) @ components.T, (b - mean) @ components.T
    fig, ax = plt.subplots(figsize=(6.2, 5))
    ax.scatter(pa[:, 0], pa[:, 1], s=8, alpha=0.6, label=f"modal (n={len(a)})")
    ax.scatter(pb[:, 0], pb[:, 1], s=8, alpha=0.6, label=f"text (n={len(b)})")
    ax.set_xlabel(f"PC1 ({ratios[0]:.1%} of union variance)")
    ax.set_ylabel(f"PC2 ({ratios[1]:.2%})")
    lines = [f"W1 = {result.w1:.2f} {_interval(result.ci, '.2f')} in {result.dims} dims"]
    if result.null_w1 is not None:
        lines.append(f"text-vs-text null = {result.null_w1:.2f}; excess = {result.excess_w1:.2f}")
    ax.set_title(f"{title} at {hook}\n" + "\n".join(lines), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interval(ci, spec: str) -> str:
    """A CI as "[low, high]", or "(no bootstrap)" when experiment.n_bootstrap=0 left none."""
    return "(no bootstrap)" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _print_table(result, title: str) -> None:
    table = Table(title=title)
    for column in ("W1", "95% CI", "null (text vs text)", "excess over null", "sliced W1", "n modal/text", "dims"):
        table.add_column(column, justify="right")
    excess = "–" if result.excess_w1 is None else f"{result.excess_w1:.3f}"
    null = "–" if result.null_w1 is None else f"{result.null_w1:.3f}"
    table.add_row(f"{result.w1:.3f}", _interval(result.ci, ".3f"), null, excess,
                  f"{result.sliced_w1:.3f}", f"{result.n_a}/{result.n_b}", str(result.dims))
    Console(width=140).print(table)


def _with_lipschitz(cfg, selection, w1: float) -> dict:
    """L_log x W1 (paper Table 8) when a lipschitz run over the same dataset selection exists for
    this model x dataset x target; otherwise `lipschitz_missing` says why there is no product.

    As in the paper, L is a norm over the adapter-output sequence and W1 is between pooled clouds
    at an LLM hook: the product is a scale comparison, not the bound's exact term."""
    dataset = {"name": cfg.dataset.name, "fingerprint": selection.fingerprint}
    summary = lipschitz_summary_entry(Path(cfg.paths.cache_dir), cfg.model, dataset, cfg.target)
    if not summary.path.is_file():
        return {"lipschitz_missing": f"no lipschitz result for {cfg.model.name} x {cfg.dataset.name} "
                                     f"(target={cfg.target.name}): run experiment=lipschitz for L x W1"}
    try:
        found = json.loads(summary.path.read_text())
        found["L_mean"], found["L_p95"]  # noqa: B018 - an entry without them is unreadable
    except (ValueError, KeyError, TypeError) as error:
        summary.quarantine(summary.path, error)
        return {"lipschitz_missing": f"the lipschitz summary entry {summary.key} was unreadable (moved aside): "
                                     "rerun experiment=lipschitz for L x W1"}
    if found.get("selection_digest") != selection.digest:
        return {"lipschitz_missing": f"the lipschitz result {found.get('run_dir')} is over another dataset selection "
                                     "(or does not name it): rerun experiment=lipschitz with this selection"}
    return {"L_mean": found["L_mean"], "L_p95": found["L_p95"], "L_mean_x_W1": found["L_mean"] * w1,
            "L_p95_x_W1": found["L_p95"] * w1, "lipschitz_target": cfg.target.name,
            "lipschitz_space": found.get("L_space"), "n_lipschitz": found.get("n_samples"),
            "lipschitz_run": found.get("run_dir"), "lipschitz_entry": f"{summary.kind}/{summary.key}"}


def run(cfg, run_dir: Path) -> dict:
    if cfg.experiment.text.source != "self":
        raise UserError("wasserstein compares the model's own LLM on both sides: experiment.text.source must be self")
    rec = recorder(cfg, run_dir)
    selection = selected_records(cfg, rec)
    extracted = modal_and_text(cfg, rec, selection)
    hook, a, b = _clouds(cfg, extracted)
    exp = cfg.experiment
    with rec.stage("w1"):
        result = w1_between(a, b, dims=exp.pca_dims, n_bootstrap=exp.n_bootstrap, seed=cfg.seed,
                            max_points=exp.max_points, n_projections=exp.n_projections)
    metrics = result.metrics()
    metrics.update(_with_lipschitz(cfg, selection, result.w1))
    rows = [rec.row(hook, "-", cfg.seed, name, value, pooling=cfg.hook.pooling, text_format=exp.text.format)
            for name, value in metrics.items() if isinstance(value, (int, float))]
    summary = {"hook": hook, **metrics, "pooling": cfg.hook.pooling, "text_format": exp.text.format}
    with rec.stage("report"):
        _figure(a, b, result, hook, run_dir / "w1_clouds.png", f"{cfg.model.name} x {cfg.dataset.name}")
    rec.write(rows, summary)
    _print_table(result, f"W1 modal vs text: {cfg.model.name} x {cfg.dataset.name} at {hook}")
    if "lipschitz_missing" in metrics:
        log.info("L x W1: %s", metrics["lipschitz_missing"])
    if "L_mean_x_W1" in metrics:
        log.info("L_log x W1 (target=%s): mean %.4g, p95 %.4g", metrics["lipschitz_target"], metrics["L_mean_x_W1"],
                 metrics["L_p95_x_W1"])
    return summary
