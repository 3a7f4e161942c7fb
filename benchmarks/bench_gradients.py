"""Batched LLM-only gradient pass vs one full multimodal forward+backward per sample (the earlier code's shape).

Both sides use the same tiny model, the same in-memory samples and the same score, the mean log-prob of the
answer tokens (the transcript/caption, then EOS) after the prompt, and take ||d score / d z|| with z the adapter
output. Ours gets z from the adapter-sequence cache (computed here once beforehand, not timed), composes the
prompt rows around it and runs only the LLM, one backward per batch of samples of similar length. The baseline
runs the whole model per sample (encoder and adapter included) with a forward hook swapping the adapter output for
a leaf tensor, the loss on the answer tokens, and one torch.autograd.grad. Prints per-sample ms for each side, the
ratio, and the largest relative difference between the two sides' gradient norms (~1e-4 or less in float32).

    python benchmarks/bench_gradients.py [--model tiny_qwen2audio|tiny_llava] [--n 32] [--batch-size 8] [--threads 1]

--threads caps torch's thread pool (default 1: on a small or shared machine one thread is faster than several).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mcollapse.analysis.lipschitz import per_sample_gradient_norms
from mcollapse.cli import config_dir
from mcollapse.config import ModelConfig
from mcollapse.data.base import Record, Sample
from mcollapse.extraction.hooks import capture
from mcollapse.extraction.sequences import adapter_target
from mcollapse.models import load_model
from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.runtime import seed_everything, set_threads


def model_cfg(name: str):
    loaded = OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml")
    loaded.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)


def make_samples(modality: str, n: int, rng: np.random.Generator) -> list[Sample]:
    """Sine-wave clips of 1-4 s, or random-pixel images of varying height, each with a short text."""
    out = []
    for i in range(n):
        if modality == "audio":
            t = np.arange(int(16_000 * rng.uniform(1.0, 4.0))) / 16_000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
            record = Record(id=f"a{i}", path=Path(f"a{i}.wav"), modality="audio", text=f"sample number {i}")
            out.append(Sample(record, audio=wave.astype(np.float32)))
        else:
            from PIL import Image

            pixels = rng.integers(0, 255, size=(40 + 8 * (i % 16), 48, 3), dtype=np.uint8)
            record = Record(id=f"i{i}", path=Path(f"i{i}.jpg"), modality="image", text=f"a picture {i}")
            out.append(Sample(record, image=Image.fromarray(pixels)))
    return out


def adapter_sequences(family, target, samples, batch_size) -> list[torch.Tensor]:
    """What the cache holds: each sample's adapter output (T_i, d), padding frames dropped."""
    out = []
    for start in range(0, len(samples), batch_size):
        batch = family.prepare(samples[start : start + batch_size]).to(family.device, family.dtype)
        inputs = dict(batch.inputs)
        z = capture(family.model, [target], lambda: family.model(**inputs, use_cache=False))[target.name].float()
        lengths = batch.frame_lengths if batch.frame_lengths is not None else torch.full((len(z),), z.shape[1])
        out.extend(z[i, : int(lengths[i])].cpu() for i in range(len(z)))
    return out


def ours(decoder, zs, answers, batch_size) -> torch.Tensor:
    """The pipeline's shape: batches of similar length, LLM only, one backward per batch."""
    order = np.argsort([len(z) + len(a) for z, a in zip(zs, answers)], kind="stable")
    norms = torch.empty(len(zs))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = compose(decoder.family, [len(zs[i]) for i in rows], [answers[i] for i in rows], "content", "mean")
        norms[rows] = per_sample_gradient_norms(lambda z, b=batch: decoder.scores(b, z),
                                                pad_sequences([zs[i] for i in rows]), mask=batch.z_mask)
    return norms


def per_sample_full(family, target, samples, answers) -> torch.Tensor:
    """One full forward+backward per sample: encoder re-run, adapter output swapped for a leaf."""
    module = dict(family.model.named_modules())[target.path]
    norms = []
    for sample, answer in zip(samples, answers):
        inputs = dict(family.prepare([sample]).to(family.device, family.dtype).inputs)
        answer = torch.tensor([answer], device=family.device)
        labels = torch.cat([torch.full_like(inputs["input_ids"], -100), answer], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        leaf = {}

        def swap(_module, _args, output):
            leaf["z"] = output.detach().requires_grad_(True)
            return leaf["z"]

        handle = module.register_forward_hook(swap)
        try:
            with torch.enable_grad():
                loss = family.model(**inputs, labels=labels, use_cache=False).loss
                (grad,) = torch.autograd.grad(-loss, leaf["z"])
        finally:
            handle.remove()
        norms.append(torch.linalg.vector_norm(grad.float()))
    return torch.stack(norms).cpu()


def best_time(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_qwen2audio")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 keeps torch's default)")
    args = parser.parse_args()
    seed_everything(0)
    set_threads(args.threads, small_model=False)
    cache = Path(os.environ.get("MCOLLAPSE_CACHE", Path(tempfile.gettempdir()) / "mcollapse-bench"))
    family = load_model(model_cfg(args.model), cache, "cpu")
    decoder = Decoder(family)  # freezes the weights: both sides differentiate w.r.t. z only
    target = adapter_target(family)
    samples = make_samples(family.modality, args.n, np.random.default_rng(0))
    answers = [family.answer_token_ids(s.text) for s in samples]
    zs = adapter_sequences(family, target, samples, args.batch_size)  # the cached sequences: not timed
    k = min(args.batch_size, args.n)
    ours(decoder, zs[:k], answers[:k], args.batch_size)  # warm-up
    per_sample_full(family, target, samples[:2], answers[:2])
    t_ours, batched = best_time(lambda: ours(decoder, zs, answers, args.batch_size), args.repeats)
    t_base, baseline = best_time(lambda: per_sample_full(family, target, samples, answers), args.repeats)
    rel = float(((batched - baseline).abs() / baseline.abs().clamp(min=1e-12)).max())
    print(f"model={args.model} n={args.n} batch_size={args.batch_size} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} adapter={target.path} frames={min(map(len, zs))}-{max(map(len, zs))}")
    print("ours: adapter sequences computed once beforehand (the cache), not timed; LLM-only batched backward timed")
    print(f"batched LLM-only         : {1e3 * t_ours / args.n:9.2f} ms/sample")
    print(f"per-sample full fwd+bwd  : {1e3 * t_base / args.n:9.2f} ms/sample")
    print(f"speed ratio              : {t_base / t_ours:9.2f}x")
    print(f"max rel. |norm diff|     : {rel:.2e}   (mean norm {float(baseline.mean()):.4g})")


if __name__ == "__main__":
    main()
