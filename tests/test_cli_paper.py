"""The paper grid end to end on the tiny twins of its five models: the staged sweep, then report and
verify on its dirs. The grid's jobs run one after another in one process (Hydra's basic launcher), so
the interpreter and transformers start once rather than once per job; a staged sweep through
submitit's local executor (the cluster path without a cluster) is checked on a stage of its own."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest

from mcollapse.errors import EXIT_CHECKS_FAILED
from tests.helpers import mcollapse, only_run_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TABLES = ("table5_probes", "table6_retention", "table10_prismatic", "table8_lipschitz_w1", "table11_modes",
          "table2_ablation", "table3_lora", "isotropy", "msswap", "gmi", "coverage")
TWINS = ("tiny_qwen2audio", "tiny_ultravox", "tiny_llava", "tiny_prismatic", "tiny_prismatic_siglip")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("paper")
    proc = mcollapse(["-m", "+sweep=paper_tiny", "hydra/launcher=basic"], cwd, env, timeout=1800)
    return cwd, only_run_dir(only_run_dir(cwd / "multirun")), proc


def _results(sweep_dir):
    return [json.loads(p.read_text()) | {"dir": p.parent} for p in sweep_dir.rglob("results.json")]


def test_the_staged_sweep_runs_every_job_and_computes_each_intermediate_once(sweep):
    _, sweep_dir, proc = sweep
    assert not list(sweep_dir.rglob("failed.json")), proc.stderr[-2000:]
    results = _results(sweep_dir)
    assert {(r["experiment"], r["model"]) for r in results if r["experiment"] == "probe"} == \
        {("probe", m) for m in TWINS}
    assert {r["experiment"] for r in results} == {"extract", "probe", "lipschitz", "modes", "wasserstein", "ablation",
                                                  "gradproj", "msswap", "gmi", "lora"}
    computed = defaultdict(lambda: defaultdict(int))
    for r in results:
        for key in ("modal_rows_computed", "sequence_rows_computed"):
            computed[(r["model"], r["dataset"])][key] += r["counts"].get(key, 0)
    extracted = {(r["model"], r["dataset"]): r["summary"]["modal"]["n"] for r in results
                 if r["experiment"] == "extract"}
    for pair, counts in computed.items():  # the extract stage encoded everything; later jobs only read
        assert counts["modal_rows_computed"] == extracted[pair], pair
        assert counts["sequence_rows_computed"] <= extracted[pair], pair  # once, by whichever job came first
    by = {(r["experiment"], r["model"]): r for r in results}
    probes = by[("probe", "tiny_prismatic")]["summary"]
    assert probes["hooks"] == ["encoder_output", "adapter_output", "llm_layer_16", "llm_final"]
    assert {"object_category", "super_category"} <= set(probes["probes"]["modal"])
    assert "llm_final" in probes["probes"]["text"]["lexical"]  # the same LLM fed the captions
    for twin in ("tiny_prismatic", "tiny_ultravox"):
        conditions = {(c["variant"], c["condition"]): c for c in by[("ablation", twin)]["summary"]["conditions"]}
        assert conditions[("centred", "ms_all")]["n_modes_removed"] == by[("modes", twin)]["summary"]["n_ms"] > 0
    lora = by[("lora", "tiny_ultravox")]["summary"]
    assert lora["upstream_max_abs_difference"] == {"encoder_output": 0.0, "adapter_output": 0.0}
    assert lora["task"]["lora"]["n"] == lora["split"]["test"]["n"] > 0
    for twin in ("tiny_ultravox", "tiny_llava"):  # GMI on both modalities, within its cap log(m + 1)
        gmi = by[("gmi", twin)]["summary"]
        assert gmi["gmi_modal_ci_low"] <= gmi["gmi_modal"] <= gmi["gmi_modal_ci_high"] <= gmi["cap_log_m_plus_1"]
    lipschitz = by[("lipschitz", "tiny_ultravox")]
    gradproj = [r for r in results if r["experiment"] == "gradproj"][0]
    assert gradproj["counts"]["gradients_batches_from_cache"] == lipschitz["counts"]["gradients_batches"]


def test_a_staged_sweep_through_submitits_executor(tmp_path, env):
    """The staged sweeper hands its batches to submitit_local, whose jobs run in processes of their own.
    Its own selection (max_samples) keeps these activations apart from the grid's, which counts what it computes."""
    stage = ("hydra.sweeper.stages=[{name:extract,cells:["
             "{experiment:extract,model:tiny_qwen2audio,dataset:synthetic_speech,dataset.max_samples:16},"
             "{experiment:extract,model:tiny_llava,dataset:synthetic_vision,dataset.max_samples:16}]}]")
    proc = mcollapse(["-m", "+sweep=paper_tiny", "hydra/launcher=submitit_local", stage], tmp_path, env, timeout=900)
    sweep_dir = only_run_dir(only_run_dir(tmp_path / "multirun"))
    assert (sweep_dir / ".submitit").is_dir() and not list(sweep_dir.rglob("failed.json")), proc.stderr[-2000:]
    results = _results(sweep_dir)
    assert sorted((r["experiment"], r["model"]) for r in results) == [("extract", "tiny_llava"),
                                                                      ("extract", "tiny_qwen2audio")]
    assert all(r["summary"]["modal"]["n"] == 16 for r in results)


def test_report_and_verify_on_the_sweep(sweep, env, tmp_path):
    cwd, sweep_dir, _ = sweep
    mcollapse(["experiment=report", f"report.runs={sweep_dir}"], cwd, env)
    report = only_run_dir(cwd / "outputs" / "report")
    summary = json.loads((report / "results.json").read_text())["summary"]
    assert summary["n_runs"] == len(_results(sweep_dir)) and not summary["failed"]
    for table in TABLES:
        assert summary["tables"][table]["rows"] > 0 and not summary["tables"][table]["missing"], table
        assert (report / f"{table}.csv").is_file() and (report / f"{table}.md").is_file()
    assert summary["figures"] == ["fig1_probe_trajectories.png", "fig2_mode_alignment.png"]
    text = (report / "report.md").read_text()
    assert "Nothing: every table and figure has the runs it needs." in text
    assert "(fig1_probe_trajectories.png)" in text and "(table8_lipschitz_w1.csv)" in text
    probes = (report / "table5_probes.csv").read_text().splitlines()
    assert probes[0].endswith(",source") and all("probe/" in line.rsplit(",", 1)[1] for line in probes[1:])

    passed = mcollapse(["experiment=verify", f"report.runs={sweep_dir}", "verify.expected=paper_tiny"], cwd, env)
    assert "checks passed" in passed.stderr + passed.stdout

    # the paper's numbers need the real models: every check is missing, which is a failure
    paper = mcollapse(["experiment=verify", f"report.runs={sweep_dir}"], cwd, env, check=False)
    assert paper.returncode == EXIT_CHECKS_FAILED and "none of the" in paper.stderr.strip().splitlines()[-1]

    # a perturbed value fails loudly, naming the check
    copy = tmp_path / "perturbed"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns(".submitit", "*.npz", "*.png"))
    lip_dir = only_run_dir(copy / "lipschitz" / "tiny_qwen2audio" / "synthetic_speech")
    payload = json.loads((lip_dir / "results.json").read_text())
    payload["summary"]["L_mean"] *= 1.5
    (lip_dir / "results.json").write_text(json.dumps(payload))
    failed = mcollapse(["experiment=verify", f"report.runs={copy}", "verify.expected=paper_tiny"], cwd, env,
                       check=False)
    assert failed.returncode == EXIT_CHECKS_FAILED
    assert "1 of" in failed.stderr.strip().splitlines()[-1] and "checks failed" in failed.stderr
    assert "FAIL: L and W1: tiny_qwen2audio/synthetic_speech L_mean: 1.14911, wanted 0.7661 ± 5 %" in failed.stdout
