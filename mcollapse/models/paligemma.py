"""PaliGemma(-2) in the transformers format: SigLIP -> linear projector -> Gemma(-2).

PaliGemma has no chat template. Its prompt is the image tokens, then BOS, the task text and a
newline ("<image>" * n + "<bos>" + "caption en" + "\n"); the processor expands the one "<image>"
placeholder into `image_seq_length` image tokens and inserts the BOS. The image tokens and the
prompt form the prefix, which PaliGemma reads with bidirectional attention (token_type_ids 0);
generated tokens are causal. Positions are 1-indexed in PaliGemma's forward.

Roles resolve by structure (models/roles.py): the encoder output is the input of
`multi_modal_projector` (SigLIP's last hidden state), the adapter its output, the LLM layers and
final norm those of the Gemma language model.
"""

from __future__ import annotations

import torch
from transformers import PaliGemmaForConditionalGeneration

from mcollapse.data.base import Sample
from mcollapse.models.base import Batch, ChatFamily, pad_token_rows


class PaliGemmaFamily(ChatFamily):
    modality = "image"
    placeholder = "<image>"
    model_class = PaliGemmaForConditionalGeneration

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.image_token_id)

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        """"<image>" then the task text (a system prompt, if any, goes in front of it on its own line);
        the processor adds the BOS after the image tokens and the closing newline."""
        user, system = self.configured_prompt(user, system)
        user = user.replace(self.placeholder, "").strip()
        text = f"{system}\n{user}" if system else user
        return f"{self.placeholder}{text}"

    def prompt_token_parts(self, user: str | None = None, system: str | None = None) -> tuple[list[int], list[int]]:
        """Nothing before the image; after it BOS, the task text and "\\n", as the processor builds it."""
        tok = self.tokenizer
        _, _, text = self.render_prompt(user, system).partition(self.placeholder)
        return [], [tok.bos_token_id] + tok(text + "\n", add_special_tokens=False).input_ids

    def _adds_bos(self) -> bool:
        return False  # the processor sets add_bos_token off: BOS goes after the image tokens

    def prepare(self, samples: list[Sample]) -> Batch:
        prompt = self.render_prompt()
        enc = self.processor(
            images=[s.image for s in samples], text=[prompt] * len(samples), return_tensors="pt", padding=True
        )
        image_token = self.model.config.image_token_id
        return Batch(
            ids=[s.id for s in samples],
            inputs={k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")},
            token_mask=enc["attention_mask"].bool(),
            modal_token_mask=enc["input_ids"] == image_token,
        )

    def prepare_text(self, ids: list[str], texts: list[str], fmt: str = "prompt") -> Batch:
        """`prompt`: the text where the image tokens stand, inside the bidirectional prefix as they
        are (token_type_ids 0); `raw`: BOS + the bare text, read causally."""
        if fmt == "raw":
            rows = [[self.tokenizer.bos_token_id] + self.text_token_ids(t) for t in texts]
            return pad_token_rows(ids, rows, [[0] + [1] * (len(r) - 1) for r in rows], pad_id=self.pad_token_id)
        batch = super().prepare_text(ids, texts, fmt)
        batch.inputs["token_type_ids"] = torch.zeros_like(batch.inputs["input_ids"])
        return batch
