"""LLaVA-1.5 in the llava-hf format."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

import mcollapse.models.vision  # noqa: F401  (registers smol_vision's EfficientNet-Lite tower)
from mcollapse.data.base import Sample
from mcollapse.models.base import Batch, ChatFamily


class LlavaFamily(ChatFamily):
    modality = "image"
    placeholder = "<image>"
    model_class = LlavaForConditionalGeneration

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.image_token_id)

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        """The paper's user message, wrapped in LLaVA-1.5's chat format when the checkpoint has one."""
        if getattr(self.processor, "chat_template", None):
            return super().render_prompt(user, system)
        user, system = self.configured_prompt(user, system)
        user = self.user_content(user)
        return f"{system}\n\n{user}" if system else user

    def prepare(self, samples: list[Sample]) -> Batch:
        prompt = self.render_prompt()
        enc = self.processor(
            images=[s.image for s in samples], text=[prompt] * len(samples), return_tensors="pt", padding=True
        )
        image_token = self.model.config.image_token_id
        return Batch(
            ids=[s.id for s in samples],
            inputs={k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")},
            token_mask=enc["attention_mask"].bool(),
            modal_token_mask=enc["input_ids"] == image_token,
        )
