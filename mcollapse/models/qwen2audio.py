"""Qwen2-Audio (and the architecture-compatible offline models built on it)."""

from __future__ import annotations

import torch
from transformers import Qwen2AudioForConditionalGeneration

from mcollapse.data.base import SAMPLE_RATE, Sample
from mcollapse.models.base import Batch, ChatFamily


def encoder_frames(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Valid encoder/adapter positions for `mel_lengths` mel frames: the stride-2 second conv,
    then the encoder's stride-2 average pool (as in Qwen2-Audio's own length rule)."""
    after_conv = (mel_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class Qwen2AudioFamily(ChatFamily):
    modality = "audio"
    cuts_long_audio = True  # as Qwen2-Audio's processor does
    placeholder = "<|AUDIO|>"
    model_class = Qwen2AudioForConditionalGeneration

    @property
    def placeholder_id(self) -> int:
        return int(self.processor.audio_token_id)

    @property
    def window_samples(self) -> int:
        return int(self.processor.feature_extractor.n_samples)

    def user_content(self, user: str) -> list[dict]:
        """Qwen2-Audio's turn: the audio entry, then the message."""
        return [{"type": "audio", "audio_url": "audio"}, {"type": "text", "text": user}]

    def prepare(self, samples: list[Sample]) -> Batch:
        """Clips longer than the encoder window are cut to it (the extraction counts them)."""
        window = self.window_samples
        audio = [s.audio[:window] for s in samples]
        prompt = self.render_prompt()
        enc = self.processor(
            text=[prompt] * len(samples), audio=audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True
        )
        lengths = encoder_frames(enc["feature_attention_mask"].sum(-1))
        modal = enc["input_ids"] == self.processor.audio_token_id
        if not torch.equal(modal.sum(-1), lengths):
            raise RuntimeError("audio placeholder count does not match the encoder's valid frames")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
        return Batch(
            ids=[s.id for s in samples],
            inputs=inputs,
            token_mask=enc["attention_mask"].bool(),
            modal_token_mask=modal,
            frame_lengths=lengths,
        )
