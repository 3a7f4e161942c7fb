"""Deterministic byte-level BPE tokenizers and chat templates in each family's published shape."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from mcollapse.models.twins.shapes import TEXT_MAX_POSITIONS, TOKENIZER_VOCAB_SIZE

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

# Gemma's special tokens (pad 0, eos 1, bos 2, unk 3 as in the published tokenizer); BOS prepended.
GEMMA_TOKENIZER = TokenizerRoles(
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    bos_token="<bos>",
    eos_token="<eos>",
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
