"""Batched one-pass extraction vs one forward per sample (the earlier code's shape).

Both sides use the same model and the same in-memory clips; ours batches clips of similar length,
captures every hook in one pass that stops after the deepest hook, and pools with masks; the baseline runs the full
model (LM head included) once per sample. Prints samples/s for each and the ratio, plus the
largest difference between the two sides' pooled vectors.

    python benchmarks/bench_extraction.py [--model tiny_qwen2audio|smol_speech] [--n 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcollapse.extraction.extract import _mask_for
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.pooling import masked_mean
from mcollapse.models import load_model
from mcollapse.models.roles import resolve_hooks
from mcollapse.runtime import seed_everything
from tests.helpers import audio_samples, model_cfg


def ours(family, targets, samples, batch_size):
    """The pipeline's shape: batches of similar length (as extraction orders them), one pass each."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].audio))
    samples = [samples[i] for i in order]
    out = []
    for start in range(0, len(samples), batch_size):
        batch = family.prepare(samples[start : start + batch_size])
        inputs = dict(batch.inputs)
        hidden = capture(family.model, targets, lambda: family.model(**inputs, use_cache=False))
        out.append({t.name: masked_mean(hidden[t.name], _mask_for(t, batch, "all", hidden[t.name])) for t in targets})
    restore = torch.argsort(torch.tensor(order))
    return {t.name: torch.cat([o[t.name] for o in out])[restore] for t in targets}


def per_sample_full_forward(family, targets, samples):
    """One full forward per sample with all hooks registered, LM head included."""
    named = dict(family.model.named_modules())
    rows = {t.name: [] for t in targets}
    for sample in samples:
        batch = family.prepare([sample])
        seen = {}
        handles = []
        for t in targets:
            module = named[t.path]
            if t.capture == "input":
                handles.append(module.register_forward_pre_hook(lambda m, a, n=t.name: seen.setdefault(n, a[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, n=t.name: seen.setdefault(n, o[0] if isinstance(o, tuple) else o)))
        with torch.no_grad():
            family.model(**batch.inputs, use_cache=False)
        for h in handles:
            h.remove()
        for t in targets:
            rows[t.name].append(masked_mean(seen[t.name], _mask_for(t, batch, "all", seen[t.name]))[0])
    return {name: torch.stack(v) for name, v in rows.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_qwen2audio")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    seed_everything(0)
    cache = Path(os.environ.get("MCOLLAPSE_CACHE", Path(tempfile.gettempdir()) / "mcollapse-bench"))
    family = load_model(model_cfg(args.model), cache, "cpu")
    targets = resolve_hooks(family.model, family.roles, 16, {}, family.adapter_module_names())
    lengths = list(np.random.default_rng(0).uniform(1.0, 4.0, size=args.n))
    samples = audio_samples(lengths)
    ours(family, targets, samples[: args.batch], args.batch)  # warm-up
    t0 = time.perf_counter()
    batched = ours(family, targets, samples, args.batch)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline = per_sample_full_forward(family, targets, samples)
    t_base = time.perf_counter() - t0
    diff = max(float((batched[k] - baseline[k]).abs().max()) for k in batched)
    print(f"model={args.model} n={args.n} batch={args.batch} hooks={[t.name for t in targets]}")
    print(f"batched one-pass : {args.n / t_ours:8.2f} samples/s")
    print(f"per-sample full  : {args.n / t_base:8.2f} samples/s")
    print(f"speed ratio      : {t_base / t_ours:8.2f}x")
    print(f"max |difference| : {diff:.2e}")


if __name__ == "__main__":
    main()
