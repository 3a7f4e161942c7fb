"""Interrupt a mcollapse command at random moments, many times, and check every outcome.

Run as `python -m tests.interrupt_campaign SPEC.json`. The heavy imports (torch, transformers,
Hydra) happen once here; each trial is a forked child that runs the real entry point
(`mcollapse.launch.main`) with SIGINT at its default disposition, so the campaign behaves the same
however the test suite itself was launched (a shell's background job starts with SIGINT ignored).

Trials come in groups of `chain` (default 3) on one fresh cache (the built models linked in): each
is sent SIGINT at a moment drawn uniformly over an uninterrupted run's duration once the child has
routed SIGINT, resumes what the one before it left, and must exit 130 with one closing line and no
traceback. The group's cache is then re-run to completion, and the files the spec names must equal
the uninterrupted reference's, byte for byte or array for array. Writes a JSON report of every trial
to SPEC's `report` path.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import mcollapse.cli  # noqa: F401 - the heavy imports, once, before any fork
from mcollapse.launch import main as entry_point


def _routes_sigint(pid: int) -> bool:
    """Whether the child has installed a SIGINT handler (bit 2 of SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


def run(argv: list[str], cwd: Path, env: dict, log: Path, interrupt_after: float | None = None,
        modules_file: Path | None = None) -> dict:
    """One forked run of the CLI; optionally SIGINT `interrupt_after` seconds after it routes SIGINT."""
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: a fresh `mcollapse ARGV` as far as the process can tell
        code = 1
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            # the parent ignores SIGINT, so the child catches it only once mcollapse routes it
            # (the moment the parent waits for); a shell would start the command with the default
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.argv = ["mcollapse", *argv]
            entry_point()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported through the exit status and the log
            traceback.print_exc()
            code = 99
        finally:
            if modules_file is not None:
                modules_file.write_text("\n".join(sorted(sys.modules)))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sent_at = None
    if interrupt_after is not None:
        while not _routes_sigint(pid) and time.monotonic() - started < 60:
            if os.waitpid(pid, os.WNOHANG)[0]:
                raise RuntimeError(f"the run ended before routing SIGINT; see {log}")
            time.sleep(0.001)
        time.sleep(interrupt_after)
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, signal.SIGINT)
            sent_at = time.monotonic() - started
        else:  # finished before the moment came: reap it below via the status we cannot get again
            return {"exit": None, "sent_at": None, "seconds": time.monotonic() - started, "log": str(log)}
    _, status = os.waitpid(pid, 0)
    return {"exit": os.waitstatus_to_exitcode(status), "sent_at": sent_at, "seconds": time.monotonic() - started,
            "log": str(log)}


def fingerprint(root: Path, patterns: list[str]) -> dict[str, str]:
    """A digest of every file the patterns match under root (relative path -> sha256), HDF5 by content."""
    out = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.suffix == ".h5":
                import h5py
                import numpy as np

                digest = hashlib.sha256()
                with h5py.File(path, "r") as handle:
                    def visit(name, node):
                        if isinstance(node, h5py.Dataset):
                            digest.update(name.encode())
                            value = np.asarray(node[()])
                            digest.update(repr(value.tolist()).encode() if value.dtype == object
                                          else np.ascontiguousarray(value).tobytes())
                    handle.visititems(visit)
                out[str(path.relative_to(root))] = digest.hexdigest()
            else:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def warm_imports(names: list[str]) -> None:
    """Import in this (parent) process the modules a run imported, so forked trials start warm."""
    import importlib

    for name in names:
        if name.startswith(("mcollapse", "hydra", "omegaconf")) or name in sys.modules:
            continue  # mcollapse's and Hydra's own state stays fresh in every child
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that only imports in its own context is left to the child
            pass


def fresh_cache(workdir: Path, name: str, models: Path) -> Path:
    cache = workdir / name / "cache"
    if cache.parent.exists():
        shutil.rmtree(cache.parent)
    cache.mkdir(parents=True)
    os.symlink(models, cache / "models")
    return cache


def campaign(spec: dict) -> dict:
    # Python's own SIGINT handler would be inherited as "caught" by every fork, and the parent
    # would take that for the child's routing; the parent itself is never sent SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    workdir, models = Path(spec["workdir"]), Path(spec["models"])
    rng = random.Random(spec.get("seed", 0))
    argv, patterns = spec["args"], spec["compare"]
    base_env = {**os.environ, **spec.get("env", {})}

    def env_for(cache: Path) -> dict:
        return {**base_env, "MCOLLAPSE_CACHE": str(cache)}

    def args_for(tag: str) -> list[str]:
        return [*argv, f"hydra.run.dir={workdir / tag / 'run'}"]

    reference_cache = fresh_cache(workdir, "reference", models)
    modules = workdir / "modules.txt"
    run(args_for("warm-up"), workdir, env_for(fresh_cache(workdir, "warm-up", models)), workdir / "warm-up.log",
        modules_file=modules)
    warm_imports(modules.read_text().split())  # each child then pays for the run, not for its imports
    reference = run(args_for("reference"), workdir, env_for(reference_cache), workdir / "reference.log")
    if reference["exit"] != 0:
        raise RuntimeError(f"the uninterrupted run failed: {Path(reference['log']).read_text()[-3000:]}")
    expected = fingerprint(reference_cache, patterns)
    if not expected:
        raise RuntimeError(f"no file matches {patterns} after the uninterrupted run")
    trials, group = [], 0
    while len(trials) < spec["trials"]:  # groups of `chain` interrupts on one cache, then one re-run
        tag = f"group-{group:02d}"
        group += 1
        cache = fresh_cache(workdir, tag, models)
        members = []
        while len(members) < spec.get("chain", 3) and len(trials) + len(members) < spec["trials"]:
            moment = rng.uniform(0.0, spec.get("window", 1.0) * reference["seconds"])
            name = f"{tag}-{len(members)}"
            interrupted = run(args_for(name), workdir, env_for(cache), workdir / f"{name}.log", interrupt_after=moment)
            if interrupted["sent_at"] is None:
                break  # the run finished before the moment: this cache is complete, re-run and compare it
            log = Path(interrupted["log"]).read_text()
            lines = log.strip().splitlines()
            members.append({"moment": moment, "exit": interrupted["exit"],
                            "traceback": "Traceback" in log or "Exception ignored" in log,
                            "last_line": lines[-1] if lines else "", "log": interrupted["log"]})
        resumed = run(args_for(tag + "-rerun"), workdir, env_for(cache), workdir / f"{tag}-rerun.log")
        identical = fingerprint(cache, patterns) == expected
        trials += [{**m, "rerun_exit": resumed["exit"], "identical": identical} for m in members]
        if identical:
            shutil.rmtree(cache.parent)  # a differing one stays for inspection
    return {"reference_seconds": reference["seconds"], "trials": trials}


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    report = campaign(spec)
    Path(spec["report"]).write_text(json.dumps(report, indent=2))


def run_campaign(tmp_path: Path, env: dict, models: Path, args: list[str], compare: list[str],
                 trials: int = 30, seed: int = 0) -> dict:
    """Run a campaign in a process of its own (SIGINT at its default there) and return its report."""
    import subprocess

    spec = {"workdir": str(tmp_path / "campaign"), "models": str(models), "args": args, "compare": compare,
            "trials": trials, "seed": seed, "env": env, "report": str(tmp_path / "report.json")}
    Path(spec["workdir"]).mkdir(parents=True)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "tests.interrupt_campaign", str(tmp_path / "spec.json")], check=True,
                   cwd=Path(__file__).resolve().parents[1], env=env, timeout=1800,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return json.loads(Path(spec["report"]).read_text())


def failures(report: dict) -> list[dict]:
    """The trials that did not end as they must: exit 130, one closing line, no traceback, an
    identical re-run."""
    return [t for t in report["trials"]
            if t["exit"] != 130 or t["rerun_exit"] != 0 or t["traceback"] or not t["identical"]
            or not t["last_line"].startswith("mcollapse: interrupted;")]
