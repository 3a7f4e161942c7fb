"""Training the LoRA on cached adapter outputs: epochs, early stopping on validation, resumable.

LoRA changes the LLM only, so the encoder and adapter outputs a sample feeds the LLM are the
same before and after training; each sample's cached adapter sequence z is placed into the task
prompt and only the LLM runs (forward and backward). The loss is the causal-LM cross-entropy on
the answer tokens alone (the prompt, the chat header and z are context, never targets).

Every finished epoch is written to a state file (adapter, optimiser, history) and every
improvement on the validation loss to `best/` (a standard peft adapter folder), both atomically,
so an interrupted run resumes at the next epoch and ends exactly as an uninterrupted one: the
epoch's sample order and dropout masks are seeded by (seed, epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcollapse.errors import UserError
from mcollapse.models.decoder import Decoder, compose, pad_sequences
from mcollapse.progress import progress_bar
from mcollapse.store import publish_dir
from mcollapse.store.checked import Unreadable, check_safetensors, read_training_state
from mcollapse.store.entry import cache_dir_of, read_or_quarantine
from mcollapse.store.space import save_torch

log = logging.getLogger(__name__)

STATE_KEYS = ("adapter", "optimizer", "outcome")  # what a readable state.pt holds

STATE_FILE = "state.pt"
BEST_DIR = "best"


@dataclass
class Example:
    id: str
    z: np.ndarray  # adapter output (T, d)
    answer: list[int]  # target tokens, end-of-turn included


@dataclass
class Outcome:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    bad_epochs: int = 0
    steps: int = 0
    done: bool = False
    resumed_at_epoch: int = 0  # epochs found finished in the state file (0: trained from scratch)


def batches_of(examples: list[Example], size: int):
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def answer_loss(decoder: Decoder, examples: list[Example], parts, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy per answer token over `examples`, and the token accuracy (no gradients)."""
    total, tokens, correct = 0.0, 0, 0
    ordered = sorted(examples, key=lambda e: e.z.shape[0])  # similar lengths batch with less padding
    with torch.no_grad():
        for chunk in batches_of(ordered, batch_size):
            batch = compose(decoder.family, [e.z.shape[0] for e in chunk], [e.answer for e in chunk],
                            "content", "sum", parts)
            loss, n, hits = decoder.answer_loss(batch, pad_sequences([e.z for e in chunk]))
            total += float(loss) * n
            tokens += n
            correct += hits
    return total / max(tokens, 1), correct / max(tokens, 1)


class Trainer:
    def __init__(self, decoder: Decoder, peft_model, settings, parts, state_dir: Path, seed: int,
                 eval_batch_size: int):
        self.decoder = decoder
        self.model = peft_model
        self.settings = settings
        self.parts = parts
        self.state_dir = Path(state_dir)
        self.seed = int(seed)
        self.eval_batch_size = int(eval_batch_size)
        self.trainable = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr,
                                           weight_decay=settings.weight_decay)

    def fit(self, train: list[Example], val: list[Example]) -> Outcome:
        outcome = self._resume()
        if outcome.done:
            log.info("LoRA training found finished in %s", self.state_dir)
            return outcome
        if self.settings.gradient_checkpointing and self.decoder.device.type == "cuda":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for epoch in range(len(outcome.history) + 1, self.settings.epochs + 1):
            train_loss, train_acc = self._epoch(train, epoch, outcome)
            self.model.eval()  # no dropout while validating
            val_loss, val_acc = answer_loss(self.decoder, val, self.parts, self.eval_batch_size)
            improved = val_loss < outcome.best_val_loss
            outcome.history.append({"epoch": epoch, "train_loss": train_loss, "train_token_accuracy": train_acc,
                                    "val_loss": val_loss, "val_token_accuracy": val_acc, "improved": improved})
            log.info("epoch %d: train loss %.4f, val loss %.4f, val token acc %.3f%s", epoch, train_loss,
                     val_loss, val_acc, " (best)" if improved else "")
            if improved:
                outcome.best_epoch, outcome.best_val_loss, outcome.bad_epochs = epoch, val_loss, 0
                self._save_best()
            else:
                outcome.bad_epochs += 1
            outcome.done = outcome.bad_epochs >= self.settings.patience or epoch == self.settings.epochs
            self._save_state(outcome)
            if outcome.done:
                break
        self.model.eval()
        return outcome

    def _epoch(self, train: list[Example], epoch: int, outcome: Outcome) -> tuple[float, float]:
        """One pass in a (seed, epoch)-determined order; an optimiser step every `grad_accum` batches."""
        self.model.train()
        torch.manual_seed(self.seed * 1000 + epoch)  # dropout masks
        order = np.random.default_rng([self.seed, epoch]).permutation(len(train))
        chunks = list(batches_of([train[i] for i in order], self.settings.batch_size))
        accum = self.settings.grad_accum
        total, tokens, correct = 0.0, 0, 0
        with progress_bar(f"LoRA epoch {epoch}", total=len(chunks)) as advance:
            for index, chunk in enumerate(chunks):
                batch = compose(self.decoder.family, [e.z.shape[0] for e in chunk], [e.answer for e in chunk],
                                "content", "sum", self.parts)
                loss, n, hits = self.decoder.answer_loss(batch, pad_sequences([e.z for e in chunk]))
                (loss / accum).backward()
                total, tokens, correct = total + loss.item() * n, tokens + n, correct + hits
                if (index + 1) % accum == 0 or index == len(chunks) - 1:
                    self._step(outcome)
                advance(1)
        return total / max(tokens, 1), correct / max(tokens, 1)

    def _step(self, outcome: Outcome) -> None:
        if outcome.steps == 0 and not any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                          for p in self.trainable):
            raise RuntimeError("the LoRA parameters got no gradient: the loss does not reach the adapter")
        torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        outcome.steps += 1

    def _save_state(self, outcome: Outcome) -> None:
        from peft import get_peft_model_state_dict

        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                 "outcome": {k: v for k, v in vars(outcome).items() if k != "resumed_at_epoch"}}
        save_torch(state, self.state_dir / STATE_FILE)  # atomic; a full disk is one line

    def _save_best(self) -> None:
        publish_dir(self.state_dir / BEST_DIR, lambda staging: self.model.save_pretrained(str(staging)))

    def _resume(self) -> Outcome:
        from peft import set_peft_model_state_dict

        path = self.state_dir / STATE_FILE
        state = read_or_quarantine(cache_dir_of(self.state_dir, "lora"), path,
                                   lambda p: read_training_state(p, STATE_KEYS, self.decoder.device))
        if state is None:  # none yet, or unreadable (moved aside): training starts over
            return Outcome()
        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        outcome = Outcome(**state["outcome"])
        outcome.resumed_at_epoch = len(outcome.history)
        if not outcome.done:
            log.info("LoRA training resumes after epoch %d of %d", len(outcome.history), self.settings.epochs)
        return outcome

    def load_best(self) -> None:
        """Put the best epoch's adapter weights back before evaluating."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = self.state_dir / BEST_DIR / "adapter_model.safetensors"
        try:
            check_safetensors(path)
        except Unreadable as broken:
            raise UserError(f"the best LoRA epoch {path} is unreadable ({broken.reason}): delete {self.state_dir} "
                            "and re-run to train again") from None
        weights = load_file(str(path), device=str(self.decoder.device))
        set_peft_model_state_dict(self.model, weights)
        self.model.eval()

    @property
    def best_dir(self) -> Path:
        return self.state_dir / BEST_DIR
