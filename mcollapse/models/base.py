"""The interface every model family implements, so experiments never branch on the family.

A family loads a checkpoint (hub id at a pinned revision, a local dir, or an offline build),
says which module realises each hook role, and turns samples into model inputs together with
the position masks that pooling needs.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mcollapse.data.base import Sample
from mcollapse.errors import UserError

ROLES = ("encoder_output", "adapter_output", "llm_layer", "llm_final")
LLM_ROLES = ("llm_layer", "llm_final", "llm_hidden")  # llm_hidden: the per-layer hooks of hook.llm_layers
TEXT_MODEL_ROLES = ("llm_layer", "llm_final")  # the roles a text-only model resolves (llm_hidden comes from llm_layers)


@dataclass
class Batch:
    """Model inputs for one forward plus the masks pooling needs.

    `frame_lengths` counts the valid encoder/adapter positions per sample (None: all valid, as
    for fixed image patches); `token_mask` marks real (non-padding) LLM positions (B, L);
    `modal_token_mask` marks the audio/image positions inside the LLM sequence (for text input:
    the text's own tokens); `encoder_frame_lengths` counts the encoder's valid positions where
    they differ from the adapter's (None: the same as `frame_lengths`); `text_token_mask` marks
    the caption/transcript positions of a media + text input (`ChatFamily.prepare_with_text`).
    """

    ids: list[str]
    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor
    modal_token_mask: torch.Tensor
    frame_lengths: torch.Tensor | None = None
    encoder_frame_lengths: torch.Tensor | None = None
    text_token_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        moved = {}
        for name, value in self.inputs.items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            moved[name] = value.to(device)
        self.inputs = moved
        return self


class ModelFamily(ABC):
    """One loaded model of a family. Subclasses set `modality` and implement the abstract parts."""

    modality: str = "text"
    cuts_long_audio: bool = False  # True: audio beyond the encoder window is cut off (and counted)

    def __init__(self, cfg, checkpoint: str | Path, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.checkpoint = str(checkpoint)
        self.device = device
        self.dtype = dtype
        self.model: nn.Module = self._load_model()
        if getattr(cfg, "projector", None):
            from mcollapse.models.projector import load_projector, projector_module

            load_projector(projector_module(self.model, self.adapter_module_names())[1], cfg.projector)
        if getattr(cfg, "lora", None):
            from mcollapse.models.lora import with_adapter

            self.model = with_adapter(self.model, cfg.lora)
        self.model.to(device).eval()
        self.processor = self._load_processor()

    @property
    def revision(self) -> str | None:
        return self.cfg.revision if not self.cfg.local_path and not self.cfg.build else None

    def hub_kwargs(self) -> dict:
        """Revision pin, and no network at all when HF_HUB_OFFLINE is set (read now, not at import)."""
        kwargs = {"revision": self.revision} if self.revision else {}
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            kwargs["local_files_only"] = True
        return kwargs

    def from_pretrained_kwargs(self) -> dict:
        return {"dtype": self.dtype, **self.hub_kwargs()}

    @abstractmethod
    def _load_model(self) -> nn.Module: ...

    @abstractmethod
    def _load_processor(self): ...

    @abstractmethod
    def prepare(self, samples: list[Sample]) -> Batch:
        """Modal input: the paper's prompt around one audio clip or image per sample."""

    @abstractmethod
    def prepare_text(self, ids: list[str], texts: list[str], fmt: str = "prompt") -> Batch:
        """Text through this model's own LLM: `prompt` puts the text where the audio/image stood,
        `raw` feeds the bare text (as the earlier text baselines did)."""

    def sample_problem(self, sample: Sample) -> str | None:
        """Why this model cannot take a readable sample whole (it is then skipped and counted)."""
        return None

    def adapter_module_names(self) -> tuple[str, ...]:
        """Attribute names a family's modality projector goes by, searched in this order."""
        return ("multi_modal_projector", "projector", "mm_projector")

    @property
    def placeholder_id(self) -> int:
        """Token id that stands for one audio/image position in the LLM's input ids."""
        raise UserError(f"model '{self.cfg.name}' is text-only: it has no audio/image positions to fill")

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES if self.modality != "text" else TEXT_MODEL_ROLES


class ChatFamily(ModelFamily):
    """Shared text handling for families whose prompt has one modality placeholder."""

    placeholder: str = ""
    model_class: type | None = None  # the transformers class a checkpoint in its published format loads with
    token_inputs: tuple[str, ...] = ("input_ids", "attention_mask")  # (B, L) inputs aligned with token positions

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def _load_model(self) -> nn.Module:
        """A checkpoint in transformers' format, through the family's model class."""
        return self.model_class.from_pretrained(self.checkpoint, **self.from_pretrained_kwargs())

    def _load_processor(self):
        """The checkpoint's own processor, padding on the right so each row keeps its positions."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(self.checkpoint, **self.hub_kwargs())
        processor.tokenizer.padding_side = "right"
        return processor

    def configured_prompt(self, user: str | None, system: str | None) -> tuple[str, str | None]:
        """`user` and `system`, or the configured prompt and system prompt where they are None."""
        return (self.cfg.prompt if user is None else user), (self.cfg.system_prompt if system is None else system)

    def user_content(self, user: str) -> str | list[dict]:
        """The user turn: the message with the placeholder in front, unless it already holds one."""
        return user if self.placeholder in user else f"{self.placeholder}\n{user}"

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        """The full prompt text with exactly one `self.placeholder` where the media goes; `user` and
        `system` replace the configured prompt and system prompt (an empty system: none).

        By default a system turn (when there is one) and the user turn, through the checkpoint's chat template
        (the processor's, or the tokenizer's when the processor has none)."""
        user, system = self.configured_prompt(user, system)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.user_content(user)})
        templater = self.processor if hasattr(self.processor, "apply_chat_template") else self.tokenizer
        return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _adds_bos(self) -> bool:
        tok = self.tokenizer
        return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]

    def prompt_token_parts(self, user: str | None = None, system: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the modality placeholder (BOS included once, as alone)."""
        tok = self.tokenizer
        prefix, sep, suffix = self.render_prompt(user, system).partition(self.placeholder)
        if not sep:
            raise ValueError("prompt has no modality placeholder to put the text in")
        bos = [tok.bos_token_id] if self._adds_bos() and not prefix.startswith(tok.bos_token or "\0") else []
        return bos + tok(prefix, add_special_tokens=False).input_ids, tok(suffix, add_special_tokens=False).input_ids

    def text_token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def answer_token_ids(self, text: str) -> list[int]:
        """The transcript/caption as the assistant's answer: its tokens, then end-of-turn (EOS)."""
        eos = self.tokenizer.eos_token_id
        return self.text_token_ids(text) + ([eos] if eos is not None else [])

    @property
    def pad_token_id(self) -> int:
        return _pad_id(self.tokenizer)

    def prepare_text(self, ids: list[str], texts: list[str], fmt: str = "prompt") -> Batch:
        tok = self.tokenizer
        rows, modal = [], []
        if fmt == "prompt":
            pre, post = self.prompt_token_parts()
            for text in texts:
                body = self.text_token_ids(text)
                rows.append(pre + body + post)
                modal.append([0] * len(pre) + [1] * len(body) + [0] * len(post))
        elif fmt == "raw":
            for text in texts:
                enc = tok(text, return_special_tokens_mask=True)
                rows.append(list(enc.input_ids))
                modal.append([1 - m for m in enc.special_tokens_mask])
        else:
            raise ValueError(f"unknown text format '{fmt}' (prompt | raw)")
        return pad_token_rows(ids, rows, modal, pad_id=_pad_id(tok))


    def prepare_with_text(self, samples: list[Sample], texts: list[str]) -> Batch:
        """Media first, then the text: the modal prompt of `prepare`, followed by each sample's
        text as the (teacher-forced) answer, in one sequence. `modal_token_mask` marks the
        audio/image positions (P), `text_token_mask` the text's own tokens (T); padding stays on
        the right, so every valid position keeps the position it has alone."""
        if len(texts) != len(samples):
            raise ValueError("one text per sample")
        batch = self.prepare(samples)
        lengths = [int(n) for n in batch.token_mask.sum(dim=1)]
        bodies = [self.text_token_ids(t) for t in texts]
        width = max(n + len(b) for n, b in zip(lengths, bodies))
        rows = len(samples)

        def widened(value: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((rows, width), fill, dtype=value.dtype)
            for i, n in enumerate(lengths):
                out[i, :n] = value[i, :n]
            return out

        for name in self.token_inputs:
            if name in batch.inputs:
                batch.inputs[name] = widened(batch.inputs[name], self.pad_token_id if name == "input_ids" else 0)
        text_mask = torch.zeros((rows, width), dtype=torch.bool)
        for i, (n, body) in enumerate(zip(lengths, bodies)):
            batch.inputs["input_ids"][i, n : n + len(body)] = torch.tensor(body, dtype=torch.long)
            batch.inputs["attention_mask"][i, : n + len(body)] = 1
            text_mask[i, n : n + len(body)] = True
        batch.modal_token_mask = widened(batch.modal_token_mask, False)
        batch.token_mask = batch.inputs["attention_mask"].bool()
        batch.text_token_mask = text_mask
        return batch


def _pad_id(tok) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def pad_token_rows(ids: list[str], rows: list[list[int]], modal: list[list[int]], pad_id: int) -> Batch:
    """Right-pad token rows into a Batch: valid positions keep the positions they have alone."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    modal_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, marks) in enumerate(zip(rows, modal)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        modal_mask[i, : len(marks)] = torch.tensor(marks, dtype=torch.bool)
    return Batch(
        ids=list(ids),
        inputs={"input_ids": input_ids, "attention_mask": attention},
        token_mask=attention.bool(),
        modal_token_mask=modal_mask,
    )
