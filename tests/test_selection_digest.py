"""Every run's summary names its dataset selection, so runs are only paired over the same samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from mcollapse.data.base import Record
from mcollapse.pipeline import inputs as common
from mcollapse.report.output import RunRecorder


def _select(monkeypatch, tmp_path, ids: list[str], fingerprint: str, max_samples=None) -> str:
    records = [Record(id=i, path=Path(f"{i}.wav"), modality="audio", text="x") for i in ids]
    monkeypatch.setattr(common, "load_records", lambda dataset, digests=None: (records, {"fingerprint": fingerprint}))
    cfg = SimpleNamespace(dataset=SimpleNamespace(name="d", max_samples=max_samples, stratify_by=None), seed=0,
                          paths=SimpleNamespace(cache_dir=tmp_path / "cache"))
    rec = RunRecorder(tmp_path / f"run-{len(list(tmp_path.iterdir()))}", {"experiment": "x"})
    selection = common.selected_records(cfg, rec)
    rec.write([], {"value": 1.0})
    summary = json.loads((rec.run_dir / "results.json").read_text())["summary"]
    assert summary["selection_digest"] == selection.digest and summary["value"] == 1.0
    return selection.digest


def test_selection_digest_follows_the_selected_ids_and_the_dataset(monkeypatch, tmp_path):
    base = _select(monkeypatch, tmp_path, ["a", "b", "c"], "f1")
    assert _select(monkeypatch, tmp_path, ["a", "b", "c"], "f1") == base
    assert _select(monkeypatch, tmp_path, ["a", "b", "d"], "f1") != base
    assert _select(monkeypatch, tmp_path, ["a", "b", "c"], "f2") != base
    assert _select(monkeypatch, tmp_path, ["a", "b", "c"], "f1", max_samples=2) != base


def test_wasserstein_takes_l_only_from_a_lipschitz_run_over_the_same_selection(tmp_path):
    from mcollapse.experiments.wasserstein import _with_lipschitz
    from mcollapse.pipeline.decoder_side import lipschitz_summary_entry
    from mcollapse.store import write_json

    cfg = SimpleNamespace(paths=SimpleNamespace(cache_dir=str(tmp_path)), model=SimpleNamespace(name="m", lora=None),
                          dataset=SimpleNamespace(name="d"), target=SimpleNamespace(name="content", reduction="sum"))
    selection = common.Selection([], "f" * 16, "s1")
    path = lipschitz_summary_entry(tmp_path, cfg.model, {"name": "d", "fingerprint": "f" * 16}, cfg.target).path
    assert "no lipschitz result" in _with_lipschitz(cfg, selection, 2.0)["lipschitz_missing"]
    write_json(path, {"L_mean": 1.5, "L_p95": 3.0, "n_samples": 7, "L_space": "adapter_output",
                      "selection_digest": "s1", "run_dir": "r"})
    paired = _with_lipschitz(cfg, selection, 2.0)
    assert paired["L_mean_x_W1"] == 3.0 and paired["L_p95_x_W1"] == 6.0
    assert paired["n_lipschitz"] == 7 and paired["lipschitz_space"] == "adapter_output"
    for other in ({"selection_digest": "s2"}, {}):  # another selection, or one that was not recorded
        write_json(path, {"L_mean": 1.5, "L_p95": 3.0, "n_samples": 7, "run_dir": "r", **other})
        result = _with_lipschitz(cfg, selection, 2.0)
        assert "L_mean_x_W1" not in result and "selection" in result["lipschitz_missing"]
