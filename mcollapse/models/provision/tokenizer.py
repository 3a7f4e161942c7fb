"""SmolLM2's tokenizer made a Qwen2-Audio or LLaVA one: the modality markers, a chat template, new rows."""

from __future__ import annotations

import torch
from tokenizers import AddedToken

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's ChatML format, with Qwen2-Audio's way of announcing each audio clip.
AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{{ 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\n' }}"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


IMAGE_TOKEN = "<image>"

# SmolLM2's ChatML format; an image part stands where LLaVA's processor expands `<image>`.
IMAGE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def add_markers(tokenizer, markers: tuple[str, ...], chat_template: str, max_length: int) -> None:
    """SmolLM2's tokenizer plus `markers` as special tokens and `chat_template`."""
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in markers], special_tokens=True
    )
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = max_length
    for loading_option in ("local_files_only", "is_local", "name_or_path"):
        tokenizer.init_kwargs.pop(loading_option, None)  # not meant to be saved with it


def add_audio_markers(tokenizer, max_length: int) -> None:
    """SmolLM2's tokenizer plus Qwen2-Audio's three audio markers as special tokens and its chat template."""
    add_markers(tokenizer, (AUDIO_TOKEN, AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN), AUDIO_CHAT_TEMPLATE, max_length)


def add_image_marker(tokenizer, max_length: int) -> None:
    """SmolLM2's tokenizer plus LLaVA's `<image>` as a special token and the image chat template."""
    add_markers(tokenizer, (IMAGE_TOKEN,), IMAGE_CHAT_TEMPLATE, max_length)


def embeddings_for_new_tokens(embeddings: torch.Tensor, original_vocab: int, vocab_size: int) -> torch.Tensor:
    """New token rows start at the mean embedding: neutral, and in the embeddings' own scale."""
    if embeddings.shape[0] != original_vocab:
        raise ValueError(
            f"SmolLM2 has {embeddings.shape[0]} embeddings but {original_vocab} tokens"
        )
    new_rows = embeddings.mean(dim=0, keepdim=True).expand(vocab_size - original_vocab, -1)
    return torch.cat([embeddings, new_rows], dim=0).contiguous()
