"""Training only the modality projector through the frozen LLM, on cached encoder outputs.

The encoder and the LLM are frozen, so each sample's encoder output x (what the encoder hands the
projector) is computed once and cached; every step runs the projector on x, places its output z
in the model's own prompt, and runs the LLM forward and backward (gradients reach the projector
alone). The loss is the causal-LM cross-entropy on the answer tokens (the transcript or caption,
then end-of-turn), the content target of the decoder experiments.

Steps, not epochs, are the unit: AdamW with linear warmup and cosine decay, gradient clipping, a
held-out loss every `eval_every` steps with early stopping on it, and a projector checkpoint every
`checkpoint_every` steps that stays (analyses can run along training). The sample order of epoch
e is a permutation seeded by (seed, e), so the batch of any step is known in advance: the state
file written at each evaluation (projector, optimiser, schedule, history) lets a killed run resume
at that step and go on exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.models.projector import WEIGHTS_FILE, save_projector
from mcollapse.progress import progress_bar
from mcollapse.store.checked import read_training_state
from mcollapse.store.entry import cache_dir_of, read_or_quarantine
from mcollapse.store.space import save_torch

log = logging.getLogger(__name__)

STATE_KEYS = ("projector", "optimizer", "schedule", "outcome")  # what a readable state.pt holds

STATE_FILE = "state.pt"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class Example:
    id: str
    x: np.ndarray  # encoder output: the projector's input (T, d_in)
    answer: list[int]  # target tokens, end-of-turn included


@dataclass
class Outcome:
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    step: int = 0
    best_step: int = 0
    best_dev_loss: float = float("inf")
    bad_evals: int = 0
    stop_reason: str = ""  # max_steps | early_stopping | time_budget ("" while training)
    seconds: float = 0.0  # training wall time over all sessions
    resumed_at_step: int = 0  # the step the state file held (0: trained from scratch)
    checkpoints: list[int] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where it pays (CUDA, or a CPU with bf16 instructions), else None (float32)."""
    if setting == "none":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    supported = getattr(torch.backends.mkldnn, "is_available", lambda: False)() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if supported else None


def trainable_parameters(model: nn.Module, projector: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the projector, and check that nothing else is left trainable."""
    own = {id(p) for p in projector.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in own)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != own or not trainable:
        raise RuntimeError("the trainable parameters are not exactly the projector's")
    return trainable


def project(projector: nn.Module, xs: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The projector's outputs z, zero-padded (B, T_max, d), and each sample's length.

    A projector that maps position to position runs once on the padded batch; one that changes the
    sequence length (frame stacking) runs sample by sample, so padding never enters it."""
    dtype = next(projector.parameters()).dtype
    padded = pad_sequences(xs).to(device=device, dtype=dtype)
    z = projector(padded)
    if z.shape[1] == padded.shape[1]:
        return z, [int(x.shape[0]) for x in xs]
    outs = [projector(torch.as_tensor(x, dtype=dtype, device=device)[None])[0] for x in xs]
    lengths = [int(o.shape[0]) for o in outs]
    z = torch.zeros((len(outs), max(lengths), outs[0].shape[-1]), dtype=outs[0].dtype, device=device)
    for b, o in enumerate(outs):
        z[b, : o.shape[0]] = o
    return z, lengths


def batches_of(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def projected_loss(decoder: Decoder, projector: nn.Module, chunk: list[Example], parts,
                   autocast: torch.dtype | None) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over the answer tokens of `chunk`, with the token count and argmax hits."""
    z, lengths = project(projector, [e.x for e in chunk], decoder.device)
    batch = compose(decoder.family, lengths, [e.answer for e in chunk], "content", "sum", parts)
    context = nullcontext() if autocast is None else torch.autocast(decoder.device.type, dtype=autocast)
    with context:
        return decoder.answer_loss(batch, z)


def evaluate(decoder: Decoder, projector: nn.Module, examples: list[Example], parts, batch_size: int,
             autocast: torch.dtype | None = None) -> tuple[float, float]:
    """Mean cross-entropy per answer token and token accuracy over `examples` (no gradients)."""
    total, tokens, correct = 0.0, 0, 0
    ordered = sorted(examples, key=lambda e: e.x.shape[0])  # similar lengths batch with less padding
    with torch.no_grad():
        for chunk in batches_of(ordered, batch_size):
            loss, n, hits = projected_loss(decoder, projector, chunk, parts, autocast)
            total, tokens, correct = total + float(loss) * n, tokens + n, correct + hits
    return total / max(tokens, 1), correct / max(tokens, 1)


class ProjectorTrainer:
    def __init__(self, decoder: Decoder, projector: nn.Module, settings, parts, state_dir: Path, seed: int,
                 eval_batch_size: int):
        self.decoder = decoder
        self.projector = projector
        self.settings = settings
        self.parts = parts
        self.state_dir = Path(state_dir)
        self.seed = int(seed)
        self.eval_batch_size = int(eval_batch_size)
        self.trainable = trainable_parameters(decoder.model, projector)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.max_steps,
                                                   settings.min_lr_ratio))
        self.autocast = autocast_dtype(settings.autocast, decoder.device)

    def loss(self, chunk: list[Example]) -> tuple[torch.Tensor, int, int]:
        return projected_loss(self.decoder, self.projector, chunk, self.parts, self.autocast)

    def evaluate(self, examples: list[Example]) -> tuple[float, float]:
        return evaluate(self.decoder, self.projector, examples, self.parts, self.eval_batch_size, self.autocast)

    def batch_at(self, train: list[Example], step: int) -> list[Example]:
        """The batch of optimiser step `step`: known in advance, so a resumed run takes the same."""
        size = self.settings.batch_size
        per_epoch = max(1, len(train) // size)  # the ragged tail of an epoch is dropped
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(train))
        return [train[i] for i in order[offset * size : (offset + 1) * size]]

    def fit(self, train: list[Example], dev: list[Example], max_minutes: float | None = None) -> Outcome:
        outcome = self._resume()
        if outcome.stop_reason == "time_budget" and (max_minutes is None or outcome.seconds < 60 * max_minutes):
            outcome.stop_reason = ""  # a larger budget goes on from where the smaller one stopped
        if outcome.stop_reason:
            log.info("projector training found finished in %s (%s)", self.state_dir, outcome.stop_reason)
            return outcome
        settings = self.settings
        started = time.perf_counter()
        spent_before = outcome.seconds
        if outcome.step == 0:
            self._evaluate_and_save(train, dev, outcome, [], started, spent_before)  # the untrained baseline
        window: list[tuple[float, int, int]] = []
        with progress_bar("projector steps", total=settings.max_steps - outcome.step) as advance:
            while outcome.step < settings.max_steps:
                self.projector.train()
                loss, n, hits = self.loss(self.batch_at(train, outcome.step))
                loss.backward()
                if outcome.step == 0 and not any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                                 for p in self.trainable):
                    raise RuntimeError("the projector got no gradient: the loss does not reach it")
                torch.nn.utils.clip_grad_norm_(self.trainable, settings.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
                outcome.step += 1
                window.append((float(loss.detach()) * n, n, hits))
                if outcome.step % settings.checkpoint_every == 0 or outcome.step == settings.max_steps:
                    save_projector(self.projector, self.state_dir / CHECKPOINTS_DIR / f"step-{outcome.step:06d}"
                                   / WEIGHTS_FILE)
                    outcome.checkpoints.append(outcome.step)
                over_time = max_minutes is not None and \
                    spent_before + time.perf_counter() - started > 60 * max_minutes
                if outcome.step % settings.eval_every == 0 or outcome.step == settings.max_steps or over_time:
                    self._evaluate_and_save(train, dev, outcome, window, started, spent_before, over_time)
                    window = []
                    if outcome.stop_reason:
                        break
                advance(1)  # a Ctrl-C stops here; the re-run resumes at the last evaluation's saved state
        self.projector.eval()
        return outcome

    def _evaluate_and_save(self, train, dev, outcome: Outcome, window, started: float, spent_before: float,
                           over_time: bool = False) -> None:
        self.projector.eval()
        dev_loss, dev_acc = self.evaluate(dev)
        tokens = sum(n for _, n, _ in window)
        entry = {"step": outcome.step, "lr": self.schedule.get_last_lr()[0], "dev_loss": dev_loss,
                 "dev_token_accuracy": dev_acc,
                 "train_loss": sum(t for t, _, _ in window) / tokens if tokens else None,
                 "train_token_accuracy": sum(h for _, _, h in window) / tokens if tokens else None}
        improved = dev_loss < outcome.best_dev_loss
        entry["improved"] = improved
        outcome.history.append(entry)
        log.info("step %d: train loss %s, dev loss %.4f, dev token acc %.3f%s", outcome.step,
                 f"{entry['train_loss']:.4f}" if tokens else "-", dev_loss, dev_acc, " (best)" if improved else "")
        if improved:
            outcome.best_step, outcome.best_dev_loss, outcome.bad_evals = outcome.step, dev_loss, 0
            save_projector(self.projector, self.state_dir / BEST_DIR / WEIGHTS_FILE)
        elif outcome.step > 0:
            outcome.bad_evals += 1
        if outcome.step >= self.settings.max_steps:
            outcome.stop_reason = "max_steps"
        elif outcome.bad_evals >= self.settings.patience:
            outcome.stop_reason = "early_stopping"
        elif over_time:
            outcome.stop_reason = "time_budget"
        outcome.seconds = spent_before + time.perf_counter() - started
        self._save_state(outcome)

    def _save_state(self, outcome: Outcome) -> None:
        state = {"projector": {k: v.detach().cpu() for k, v in self.projector.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "outcome": {k: v for k, v in vars(outcome).items() if k != "resumed_at_step"}}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        save_torch(state, self.state_dir / STATE_FILE)  # atomic; a full disk is one line

    def _resume(self) -> Outcome:
        path = self.state_dir / STATE_FILE
        state = read_or_quarantine(cache_dir_of(self.state_dir, "projectors"), path,
                                   lambda p: read_training_state(p, STATE_KEYS, "cpu"))
        if state is None:  # none yet, or unreadable (moved aside): training starts over
            return Outcome()
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        outcome = Outcome(**state["outcome"])
        outcome.resumed_at_step = outcome.step
        log.info("resuming projector training at step %d from %s", outcome.step, path)
        return outcome
