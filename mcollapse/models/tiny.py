"""Offline tiny twins of the real model families, built from configs in code.

Tests and smoke runs need checkpoints that load through exactly the same
``from_pretrained`` calls as the real hub models, without network access and in
seconds. Each twin keeps the architecture class, processor class, special
tokens, chat template and the hook-relevant module layout of its real family
(encoder -> projector -> decoder layers -> final norm, with enough decoder layers
for ``llm_layer=16``), and shrinks every width to a few dozen units.

Checkpoints are built once per builder fingerprint into
``<cache_dir>/models/<name>-<hash>/`` (temp dir + atomic rename, guarded by a
file lock) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from mcollapse.models.prismatic import build_tiny_prismatic
from mcollapse.models.ultravox import build_tiny_ultravox

TINY_MODELS = ("tiny_qwen2audio", "tiny_llava", "tiny_llama", "tiny_ultravox", "tiny_prismatic",
               "tiny_prismatic_siglip")

# Bump whenever the files a builder writes change in a way the spec below does not capture.
BUILDER_VERSION = "2"

WEIGHT_SEED = 1234
TOKENIZER_VOCAB_SIZE = 768

# Shared tiny decoder shape: 18 layers so that the default `llm_layer=16` hook resolves.
TEXT_HIDDEN_SIZE = 32
TEXT_INTERMEDIATE_SIZE = 64
TEXT_NUM_LAYERS = 18
TEXT_NUM_HEADS = 4
TEXT_NUM_KV_HEADS = 2
TEXT_MAX_POSITIONS = 2048

# Audio twin: Whisper-style front end with a 10 s window instead of 30 s.
AUDIO_SAMPLING_RATE = 16_000
AUDIO_NUM_MEL_BINS = 80
AUDIO_CHUNK_SECONDS = 10
AUDIO_HOP_LENGTH = 160
AUDIO_MEL_FRAMES = AUDIO_CHUNK_SECONDS * AUDIO_SAMPLING_RATE // AUDIO_HOP_LENGTH
AUDIO_MAX_SOURCE_POSITIONS = AUDIO_MEL_FRAMES // 2  # conv2 has stride 2
AUDIO_D_MODEL = 32

# Vision twin: 32 px images cut into 8 px patches -> 16 patch tokens (+1 CLS).
IMAGE_SIZE = 32
IMAGE_PATCH_SIZE = 8
IMAGE_NUM_PATCHES = (IMAGE_SIZE // IMAGE_PATCH_SIZE) ** 2
VISION_HIDDEN_SIZE = 32

# Mirrors the Qwen2-Audio-Instruct chat template: ChatML with a default system turn and
# numbered "Audio N:" placeholders that the processor expands into <|AUDIO|> runs.
QWEN2AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mirrors the LLaVA-1.5 (Vicuna) conversation shape: "USER: <image>\n... ASSISTANT:".
# Images come first in a turn, then its text; string contents are accepted for text-only use.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string"
    " else message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') }}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Mirrors the Llama-3.1 chat layout Ultravox uses: header-framed turns ending in <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Prompts and chat scaffolding; repeated in training so they become few, whole-word tokens.
PROMPT_CORPUS = (
    "system\nYou are a helpful assistant.\nuser\nAudio 1: \nDescribe this audio.\nassistant\n"
    "USER: \nDescribe this image. ASSISTANT:\n"
    "What is said in this audio? Transcribe the speech. What emotion does the speaker show? "
    "What sound is this? What is in the picture? Answer with one word. Audio 2: Image 1:"
)
PROMPT_REPEATS = 8

# Small English corpus for the remaining BPE merges: digits, punctuation and words common in
# speech transcripts, sound labels and image captions.
TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A man is riding a bike down the street. "
    "A woman is holding an umbrella in the rain. Two children are playing with a ball in the park. "
    "A cat is sleeping on a red couch next to a window. A large white boat on the water. "
    "A plate of food with rice, meat and green vegetables on a wooden table. "
    "A group of people standing around a kitchen. A train is coming into the station. "
    "A small black dog runs across the grass with a stick in its mouth.",
    "She said that he would come back in the morning, but he did not. "
    "I think we should go home now, it is getting late and cold outside. "
    "They have been working here for many years and know the old house very well. "
    "It was the best of times, it was the worst of times. Where are you going? "
    "Why did you do that? How much does it cost? When will the next one arrive? "
    "Please tell me what you hear and what you see. Thank you very much.",
    "The speaker sounds happy. The speaker sounds sad. The speaker sounds angry. "
    "The voice is calm and neutral. There is fear and disgust in the voice. "
    "A man speaks. A woman speaks. A child laughs. Someone is crying.",
    "dog rooster pig cow frog cat hen insects sheep crow rain sea waves crackling fire "
    "crickets chirping birds water drops wind pouring water toilet flush thunderstorm "
    "crying baby sneezing clapping breathing coughing footsteps laughing brushing teeth "
    "snoring drinking sipping door knock mouse click keyboard typing door wood creaks "
    "can opening washing machine vacuum cleaner clock alarm clock tick glass breaking "
    "helicopter chainsaw siren car horn engine train church bells airplane fireworks hand saw",
    "zero one two three four five six seven eight nine ten hundred thousand first second third "
    "0 1 2 3 4 5 6 7 8 9 10 12 20 42 100 2024 3.5 1,000 50% #1 $5",
    ". , ; : ! ? ' \" ( ) [ ] { } - _ / \\ + = * & @ < > | ~ ` ^ ... -- 's n't 're 'll 've 'd",
    "THE AND OF TO IN IS THAT IT WAS FOR ON ARE WITH HE SHE THEY WE I YOU HIS HER AT BY "
    "this that these those here there what which who whom whose where when why how "
    "a an the and or but not no yes if then than so as of to in on at by for from with "
    "into onto over under above below between through during before after again once "
    "is are was were be been being have has had do does did will would can could should may "
    "might must shall good bad new old big small long short high low left right up down "
    "red green blue yellow black white brown orange pink purple gray color light dark "
    "man woman boy girl child people person family friend mother father house room car "
    "road city tree flower sky sun moon day night time year today tomorrow yesterday "
    "speech sound music noise voice language word sentence question answer picture photo",
)


@dataclass(frozen=True)
class TokenizerRoles:
    """Which special tokens a family's tokenizer uses, and whether it prepends BOS."""

    special_tokens: tuple[str, ...]
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str | None
    prepend_bos: bool


QWEN_TOKENIZER = TokenizerRoles(
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|AUDIO|>",
        "<|audio_bos|>",
        "<|audio_eos|>",
    ),
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    unk_token=None,
    prepend_bos=False,
)

LLAMA_TOKENIZER = TokenizerRoles(
    special_tokens=("<unk>", "<s>", "</s>", "<pad>"),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
    prepend_bos=True,
)

LLAMA3_TOKENIZER = TokenizerRoles(
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|end_of_text|>",
    unk_token=None,
    prepend_bos=True,
)

LLAVA_TOKENIZER = TokenizerRoles(
    special_tokens=LLAMA_TOKENIZER.special_tokens + ("<image>",),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
    prepend_bos=True,
)


def train_tokenizer(roles: TokenizerRoles) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on the built-in corpus and wrap it for transformers.

    Byte-level BPE never maps text to an unknown token, so any dataset text stays encodable.
    """
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(roles.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (PROMPT_CORPUS,) * PROMPT_REPEATS + TOKENIZER_CORPUS
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if roles.prepend_bos:
        bos_id = tokenizer.token_to_id(roles.bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{roles.bos_token} $A",
            pair=f"{roles.bos_token} $A {roles.bos_token} $B",
            special_tokens=[(roles.bos_token, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=roles.bos_token,
        eos_token=roles.eos_token,
        pad_token=roles.pad_token,
        unk_token=roles.unk_token,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=TEXT_MAX_POSITIONS,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """bos/eos/pad ids for the text config, so generation and padding agree with the tokenizer."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_text_config(config_class: type, tokenizer: PreTrainedTokenizerFast):
    """The shared 18-layer, 32-wide decoder, sized to the tokenizer's vocabulary."""
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_NUM_LAYERS,
        num_attention_heads=TEXT_NUM_HEADS,
        num_key_value_heads=TEXT_NUM_KV_HEADS,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        tie_word_embeddings=False,
        **special_token_ids(tokenizer),
    )


def seeded_float32_model(model_class: type, config) -> torch.nn.Module:
    """Random-init a model from a fixed seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model = model_class(config)
    return model.to(torch.float32).eval()


def build_tiny_qwen2audio(out_dir: Path) -> None:
    """Qwen2-Audio twin: Whisper-style encoder (80 mel, 10 s window) + linear projector + Qwen2."""
    tokenizer = train_tokenizer(QWEN_TOKENIZER)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=AUDIO_NUM_MEL_BINS,
        sampling_rate=AUDIO_SAMPLING_RATE,
        hop_length=AUDIO_HOP_LENGTH,
        chunk_length=AUDIO_CHUNK_SECONDS,
        n_fft=400,
        padding_value=0.0,
        padding_side="right",
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=QWEN2AUDIO_CHAT_TEMPLATE,
    )
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=AUDIO_NUM_MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        d_model=AUDIO_D_MODEL,
        max_source_positions=AUDIO_MAX_SOURCE_POSITIONS,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=tiny_text_config(Qwen2Config, tokenizer),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = seeded_float32_model(Qwen2AudioForConditionalGeneration, config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_llava(out_dir: Path) -> None:
    """LLaVA-1.5 twin: CLIP ViT (32 px, patch 8, layer -2, CLS dropped) + 2-layer MLP + Llama."""
    tokenizer = train_tokenizer(LLAVA_TOKENIZER)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=IMAGE_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position, removed again by "default"
        chat_template=VICUNA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_PATCH_SIZE,
        projection_dim=VISION_HIDDEN_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_text_config(LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=IMAGE_NUM_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = seeded_float32_model(LlavaForConditionalGeneration, config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path) -> None:
    """Text-only Llama twin, the baseline decoder loaded through AutoModelForCausalLM."""
    tokenizer = train_tokenizer(LLAMA_TOKENIZER)
    tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    model = seeded_float32_model(LlamaForCausalLM, tiny_text_config(LlamaConfig, tokenizer))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny_qwen2audio": build_tiny_qwen2audio,
    "tiny_llava": build_tiny_llava,
    "tiny_llama": build_tiny_llama,
    "tiny_ultravox": build_tiny_ultravox,
    "tiny_prismatic": build_tiny_prismatic,
    "tiny_prismatic_siglip": partial(build_tiny_prismatic, vision_backbone_id="tiny-siglip-vit"),
}

# Twins whose architecture lives in their family's module: a change there rebuilds them.
BUILDER_MODULES = {"tiny_ultravox": ("mcollapse.models.ultravox",),
                   "tiny_prismatic": ("mcollapse.models.prismatic", "mcollapse.models.vit"),
                   "tiny_prismatic_siglip": ("mcollapse.models.prismatic", "mcollapse.models.vit")}


def builder_fingerprint(name: str) -> str:
    """Short hash naming a checkpoint directory.

    Covers the builder version and everything the written files depend on (the shape
    constants, corpus, templates, and the transformers/torch versions that drive
    serialisation and random init), so a changed builder never reuses a stale checkpoint.
    """
    spec = {
        "builder_version": BUILDER_VERSION,
        "name": name,
        "seed": WEIGHT_SEED,
        "vocab": TOKENIZER_VOCAB_SIZE,
        "text": [TEXT_HIDDEN_SIZE, TEXT_INTERMEDIATE_SIZE, TEXT_NUM_LAYERS, TEXT_NUM_HEADS,
                 TEXT_NUM_KV_HEADS, TEXT_MAX_POSITIONS],
        "audio": [AUDIO_SAMPLING_RATE, AUDIO_NUM_MEL_BINS, AUDIO_CHUNK_SECONDS, AUDIO_HOP_LENGTH,
                  AUDIO_D_MODEL],
        "vision": [IMAGE_SIZE, IMAGE_PATCH_SIZE, VISION_HIDDEN_SIZE],
        "corpus": [PROMPT_CORPUS, PROMPT_REPEATS, TOKENIZER_CORPUS],
        "templates": [QWEN2AUDIO_CHAT_TEMPLATE, VICUNA_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sources": [_source_digest(sys.modules[m].__file__) for m in (__name__, *BUILDER_MODULES.get(name, ()))],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
    return digest[:10]


def _source_digest(path) -> str:
    """A builder's module source: a changed twin architecture or size never reuses an old checkpoint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the one-shard "Writing model shards" bar while building, then restore the setting."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def ensure_tiny_checkpoint(name: str, cache_dir: Path) -> Path:
    """Return the directory of tiny model `name`, building it on first use.

    The directory appears only complete: files are written to a temporary sibling and
    renamed into place, and a file lock keeps concurrent processes from building twice.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    from mcollapse.store.build import build_once

    target = Path(cache_dir) / "models" / f"{name}-{builder_fingerprint(name)}"

    def build(staging: Path) -> None:
        with quiet_progress_bars():
            BUILDERS[name](staging)

    build_once(target, build, Path.is_dir, f"tiny checkpoint {target.name}")
    return target
