"""Report tables and verify checks on planted run dirs: every number traceable, nothing invented."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mcollapse.errors import UserError
from mcollapse.experiments.report import build
from mcollapse.report.expectations import AMBIGUOUS, FAIL, MISSING, PASS, evaluate, load_expectations
from mcollapse.report.paper_tables import paper_tables
from mcollapse.report.runs import load_runs

HOOKS = ("encoder_output", "adapter_output", "llm_layer_16", "llm_final")


def _run(root: Path, name: str, experiment: str, model: str, dataset: str, summary: dict, rows=(), family="qwen2audio",
         probe="default", target="content") -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": 42, "model": {"name": model, "family": family, "modality": "audio", "lora": None},
              "dataset": {"name": dataset}, "probe": {"name": probe}, "target": {"name": target, "reduction": "sum"},
              "hook": {"pooling": "all", "llm_layer": 16}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    payload = {"experiment": experiment, "model": model, "dataset": dataset, "summary": summary, "counts": {},
               "rows": list(rows)}
    (run / "results.json").write_text(json.dumps(payload))
    return run


def _probe_rows(model, dataset, info_type, accuracies: dict, chance, kind="modal", seeds=(42, 43)):
    rows = []
    for hook, values in accuracies.items():
        for seed, value in zip(seeds, values):
            rows.append({"experiment": "probe", "model": model, "dataset": dataset, "hook": hook,
                         "info_type": info_type, "seed": seed, "metric": "accuracy", "value": value, "input": kind,
                         "pooling": "all", "probe": "default", "n_classes": round(1 / chance), "chance": chance})
    return rows


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "sweep"
    accuracies = {"encoder_output": [0.8, 0.9], "adapter_output": [0.6, 0.7], "llm_layer_16": [0.5, 0.5],
                  "llm_final": [0.4, 0.5]}
    _run(root, "probe/a", "probe", "m", "d", {}, _probe_rows("m", "d", "speaker", accuracies, 0.25))
    # a second seed of the same settings is pooled with the first, not listed apart
    _run(root, "probe/b", "probe", "m", "d", {}, _probe_rows("m", "d", "speaker", {"llm_final": [0.6, 0.6]}, 0.25,
                                                             seeds=(44, 45)))
    _run(root, "lipschitz/a", "lipschitz", "m", "d", {"L_mean": 2.0, "L_p95": 3.0, "D": 5.0, "target": "content",
                                                      "reduction": "sum", "n_samples": 10, "selection_digest": "s1",
                                                      "L_space": "adapter_output", "D_reference": 4.5,
                                                      "L_pooled_mean": 6.0, "L_secant_median": 0.5})
    _run(root, "wasserstein/a", "wasserstein", "m", "d", {"w1": 4.0, "hook": "llm_layer_16", "null_w1": 0.5,
                                                          "selection_digest": "s1"})
    _run(root, "lipschitz/other", "lipschitz", "m2", "d", {"L_mean": 1.0, "L_p95": 1.5, "D": 2.0, "target": "content",
                                                           "reduction": "sum"})
    failed = root / "ablation" / "a"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"error": "UserError: no MS mode"}))
    return root


def test_tables_pool_seeds_derive_retention_and_products_and_cite_their_runs(planted):
    runs = load_runs(str(planted))
    assert len(runs.runs) == 5 and runs.failed == [("ablation/a", "UserError: no MS mode")]
    tables = {t.name: t for t in paper_tables(runs)}
    (probe,) = tables["table5_probes"].rows
    assert probe["llm_final"] == pytest.approx(0.525) and probe["n_splits"] == 4 and probe["n_runs"] == 2
    assert probe["llm_final_std"] == pytest.approx(0.0957427, rel=1e-5)  # sample std over the four splits
    assert probe["llm_layer"] == 0.5 and probe["source"] == "probe/a;probe/b"
    (retention,) = tables["table6_retention"].rows
    assert retention["ratio_pct"] == pytest.approx(100 * 0.525 / 0.65)
    assert retention["retained_pct"] == pytest.approx(100 * (0.525 - 0.25) / (0.65 - 0.25))
    rows = {r["model"]: r for r in tables["table8_lipschitz_w1"].rows}
    assert rows["m"]["L_mean_x_W1"] == 8.0 and rows["m"]["L_p95_x_W1"] == 12.0
    assert rows["m"]["source"] == "lipschitz/a;wasserstein/a" and rows["m"]["target"] == "content"
    assert rows["m2"]["W1"] is None and rows["m2"]["L_mean_x_W1"] is None  # no W1 run: left empty, said so
    assert rows["m"]["L_space"] == "adapter_output" and rows["m"]["w1_hook"] == "llm_layer_16"
    assert (rows["m"]["D_reference"], rows["m"]["L_pooled_mean"], rows["m"]["L_secant_median"]) == (4.5, 6.0, 0.5)
    assert tables["table8_lipschitz_w1"].missing == ["m2 × d: W1 (no wasserstein run)"]
    assert tables["table10_prismatic"].missing == ["no probe runs of Prismatic models (family prismatic)"]
    assert tables["table2_ablation"].missing == ["no ablation runs"]


def test_report_writes_every_table_and_lists_what_is_missing(planted, tmp_path):
    out = tmp_path / "report"
    summary = build(load_runs(str(planted)), out)
    for name, info in summary["tables"].items():
        assert (out / info["csv"]).is_file() and (out / info["md"]).is_file(), name
    assert summary["figures"] == ["fig1_probe_trajectories.png"]  # no modes runs: no Fig. 2
    text = (out / "report.md").read_text()
    assert "## Missing pieces" in text and "fig2_mode_alignment.png: no runs to draw it from" in text
    assert "failed job `ablation/a`: UserError: no MS mode" in text
    assert "m2 × d: W1 (no wasserstein run)" in text
    assert "| 0.525 ± 0.096 |" in (out / "table5_probes.md").read_text()
    csv_text = (out / "table8_lipschitz_w1.csv").read_text().splitlines()
    assert csv_text[0].split(",")[-1] == "source" and "8.0" in csv_text[1]


def test_l_times_w1_pairs_only_runs_over_the_same_selection(tmp_path):
    root = tmp_path / "sweep"
    lip = {"L_mean": 2.0, "L_p95": 3.0, "D": 5.0, "target": "content", "reduction": "sum", "n_samples": 10}
    _run(root, "lipschitz/a", "lipschitz", "m", "d", {**lip, "selection_digest": "s1"})
    _run(root, "lipschitz/old", "lipschitz", "m", "e", lip)  # written before runs named their selection
    _run(root, "wasserstein/other", "wasserstein", "m", "d", {"w1": 4.0, "hook": "llm_layer_16",
                                                              "selection_digest": "s2"})
    _run(root, "wasserstein/e", "wasserstein", "m", "e", {"w1": 1.0, "hook": "llm_layer_16"})
    table = {t.name: t for t in paper_tables(load_runs(str(root)))}["table8_lipschitz_w1"]
    paired = [r for r in table.rows if r.get("L_mean") is not None and r.get("W1") is not None]
    assert paired == []  # different selections, or no digest to compare: no product
    assert all(r.get("L_mean_x_W1") is None for r in table.rows)
    assert "m × d: W1 (no wasserstein run over the same selection)" in table.missing
    assert "m × e: W1 (no wasserstein run over the same selection)" in table.missing
    assert "m × d: L (no lipschitz run over the same selection)" in table.missing


def test_missing_runs_and_a_bad_path_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_runs(str(tmp_path / "nowhere"))


def _expectations(tmp_path, content: dict) -> Path:
    path = tmp_path / "expected.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_checks_pass_fail_go_missing_or_ambiguous(planted, tmp_path):
    tables = {t.name: t for t in paper_tables(load_runs(str(planted)))}
    content = {
        "grids": [{"table": "table8_lipschitz_w1", "columns": ["L_mean", "W1"], "rel_tol": {"L_mean": 0.1, "W1": 0.01},
                   "rows": [{"model": "m", "expected": [2.1, 4.1]}]}],
        "checks": [
            {"name": "product", "table": "table8_lipschitz_w1", "column": "L_mean_x_W1", "expected": 8, "tol": 0.01,
             "where": {"model": "m"}},
            {"name": "sign", "table": "table6_retention", "column": "retained_pct", "max": 0, "where": {"model": "m"}},
            {"name": "absent", "table": "table11_modes", "column": "n_ms", "expected": 3, "tol": 1},
            {"name": "two rows", "table": "table8_lipschitz_w1", "column": "L_mean", "min": 0},
        ]}
    expectations = load_expectations(_expectations(tmp_path, content))
    assert [c.name for c in expectations.checks][:2] == ["table8_lipschitz_w1: m L_mean", "table8_lipschitz_w1: m W1"]
    outcomes = {o.check.name: o for o in evaluate(expectations.checks, tables)}
    assert outcomes["table8_lipschitz_w1: m L_mean"].status == PASS  # 2.0 within 10 % of 2.1
    assert outcomes["table8_lipschitz_w1: m W1"].status == FAIL  # 4.0 is not within 1 % of 4.1
    assert outcomes["product"].status == PASS and outcomes["product"].source == "lipschitz/a;wasserstein/a"
    assert outcomes["sign"].status == FAIL and "outside" in outcomes["sign"].detail
    assert outcomes["absent"].status == MISSING
    assert outcomes["two rows"].status == AMBIGUOUS and "model" in outcomes["two rows"].detail


@pytest.mark.parametrize("check,message", [
    ({"name": "x", "table": "t", "column": "c", "expected": 1}, "exactly one of 'tol' and 'rel_tol'"),
    ({"name": "x", "table": "t", "column": "c"}, "needs 'expected'"),
    ({"name": "x", "table": "t", "column": "c", "min": 0, "tolerance": 1}, "unknown key"),
])
def test_malformed_checks_are_one_line_errors(tmp_path, check, message):
    with pytest.raises(UserError, match=message):
        load_expectations(_expectations(tmp_path, {"checks": [check]}))


def test_shipped_expected_files_parse_and_name_real_tables_and_columns(planted):
    from mcollapse.cli import config_dir

    tables = {t.name: t for t in paper_tables(load_runs(str(planted)))}
    for path in sorted((Path(config_dir()) / "expected").glob("*.yaml")):
        checks = load_expectations(path).checks
        assert checks, path
        for check in checks:
            assert check.column in tables[check.table].columns, (path.name, check.name)
            low, high = check.bounds()
            assert low <= high and not (math.isinf(low) and math.isinf(high)), check.name
    paper = load_expectations(Path(config_dir()) / "expected" / "paper.yaml").checks
    assert len(paper) > 100 and any(c.name == "ultravox_lexical_retention_pct" for c in paper)


def test_each_lens_with_runs_gets_a_section_of_its_scalar_summary(tmp_path):
    _run(tmp_path, "sim", "similarity", "smol_speech", "synthetic_speech",
         {"ima_score_all": 0.31, "n_items": 43, "layers": [0, 1], "note": "P first"})
    _run(tmp_path, "sim_random", "similarity", "smol_speech_random", "synthetic_speech",
         {"ima_score_all": 0.003, "n_items": 43, "extra": 1.5})
    out = tmp_path / "report"
    summary = build(load_runs(str(tmp_path / "sim*")), out)
    assert "lens_similarity" in summary["tables"] and "lens_skip" not in summary["tables"]
    header, *lines = (out / "lens_similarity.csv").read_text().splitlines()
    assert header.split(",") == ["model", "dataset", "seed", "ima_score_all", "n_items", "note", "extra", "source"]
    assert [line.split(",")[3] for line in lines] == ["0.31", "0.003"]  # lists are left to results.json
    assert "Cross-modal similarity" in (out / "report.md").read_text()
