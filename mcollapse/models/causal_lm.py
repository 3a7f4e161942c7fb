"""Text-only causal LMs (Llama-3.1, Vicuna): the text baselines the paper compares against."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from mcollapse.data.base import Sample
from mcollapse.errors import UserError
from mcollapse.models.base import Batch, ChatFamily


class CausalLMFamily(ChatFamily):
    """Fed the bare transcript or caption (BOS added by the tokenizer), as the paper's baselines."""

    modality = "text"
    model_class = AutoModelForCausalLM

    def _load_processor(self):
        tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, **self.hub_kwargs())
        tokenizer.padding_side = "right"
        return tokenizer

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        raise UserError(f"model '{self.cfg.name}' is text-only: it takes no audio or image prompt")

    def prepare(self, samples: list[Sample]) -> Batch:
        raise UserError(
            f"model '{self.cfg.name}' is text-only; use it as a text baseline (experiment.text.source={self.cfg.name})"
        )

    def prepare_text(self, ids: list[str], texts: list[str], fmt: str = "raw") -> Batch:
        return super().prepare_text(ids, texts, fmt="raw")
