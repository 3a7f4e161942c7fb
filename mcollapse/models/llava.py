"""LLaVA-1.5 (llava-hf format) and its offline twin."""

from __future__ import annotations

from transformers import AutoProcessor, LlavaForConditionalGeneration

from mcollapse.data.base import Sample
from mcollapse.models.base import Batch, ChatFamily


class LlavaFamily(ChatFamily):
    modality = "image"
    placeholder = "<image>"

    def _load_model(self):
        return LlavaForConditionalGeneration.from_pretrained(self.checkpoint, **self.from_pretrained_kwargs())

    def _load_processor(self):
        processor = AutoProcessor.from_pretrained(self.checkpoint, **self.hub_kwargs())
        processor.tokenizer.padding_side = "right"
        return processor

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.image_token_id)

    def render_prompt(self, user: str | None = None, system: str | None = None) -> str:
        """The paper's user message, wrapped in LLaVA-1.5's chat format when the checkpoint has one."""
        user = self.cfg.prompt if user is None else user
        system = self.cfg.system_prompt if system is None else system
        user = user if self.placeholder in user else f"{self.placeholder}\n{user}"
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": user})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
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
