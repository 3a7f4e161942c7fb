"""Ultravox (fixie-ai) built from transformers 5.x classes, without the hub's remote code.

The architecture, as published: a Whisper encoder that takes audio shorter than its 30 s window
(no padding to 30 s), the projector (stack 8 encoder frames, RMSNorm, linear, SwiGLU, RMSNorm
after the first linear from v0.5 on, else after the second, linear), and a Llama-3.1 LLM whose
input embeddings get the projector's output at the audio positions: the prompt's `<|audio|>` is
expanded into ceil(mel frames / 16) copies of the end-of-turn token, overwritten by audio.

A published checkpoint (`config.json` with model_type `ultravox`, `model.safetensors`) holds the
projector and usually the fine-tuned encoder; the LLM (and the encoder, when absent) come from the
models its config names (`text_model_id`, `audio_model_id`), read by their own key names. All
sources are combined by name and every parameter must be covered exactly once: missing or
unexpected keys stop the load with the list.

Batches equal single samples: the mel frames and first convolution beyond each clip are zeroed
and padded frames are masked in attention, so a clip's vectors do not depend on its batch.
Clips longer than the encoder window are not cut: they are skipped and counted (Ultravox's own
processor would split them into 30 s chunks; the hooks here describe one window per sample).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.activations import ACT2FN
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mcollapse.data.base import SAMPLE_RATE, Sample
from mcollapse.errors import UserError
from mcollapse.models.base import Batch, ChatFamily, pad_token_rows

MODEL_TYPE = "ultravox"
ENCODER_DOWNSAMPLING = 2  # Whisper's stride-2 second convolution
PREFIXES = {"audio": "audio_tower.", "projector": "multi_modal_projector.", "text": "language_model."}


@dataclass
class UltravoxConfig:
    """The fields of an Ultravox `config.json` this implementation reads."""

    audio_config: WhisperConfig
    text_config: object  # a transformers config of a causal LM (Llama for the published models)
    stack_factor: int = 8
    hidden_size: int = 4096
    projector_act: str = "swiglu"
    projector_ln_mid: bool = False
    norm_init: float = 0.4
    audio_model_id: str | None = None
    text_model_id: str | None = None
    _commit_hash: str | None = None
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("audio_config", "text_config")}
        out["audio_config"] = self.audio_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out


def _read_config(checkpoint: Path, hub_kwargs: dict) -> UltravoxConfig:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise UserError(f"{checkpoint} is not an Ultravox checkpoint (no config.json)")
    raw = json.loads(path.read_text())
    found = raw.get("model_type")
    if found != MODEL_TYPE:
        raise UserError(f"{checkpoint} is not an Ultravox checkpoint: config model_type is '{found}', "
                        f"expected '{MODEL_TYPE}'")
    if int(raw.get("num_projector_layers") or 0) > 0:
        raise UserError("Ultravox checkpoints with a transformer projector (num_projector_layers > 0) are not "
                        "supported: only the feed-forward projector of v0.4-v0.6")
    audio = raw.get("audio_config") or {}
    if raw.get("audio_model_id") and not audio.get("d_model"):
        audio = AutoConfig.from_pretrained(_source(checkpoint, raw["audio_model_id"]), **hub_kwargs).to_dict()
    if audio.get("model_type", "whisper") != "whisper":
        raise UserError(f"Ultravox audio encoder '{audio.get('model_type')}' is not supported (expected whisper)")
    text = raw.get("text_config") or {}
    if raw.get("text_model_id") and not text.get("hidden_size"):
        text = AutoConfig.from_pretrained(_source(checkpoint, raw["text_model_id"]), **hub_kwargs).to_dict()
    text_type = text.get("model_type", "llama")
    text_config = AutoConfig.for_model(text_type, **{k: v for k, v in text.items() if k != "model_type"})
    known = {f for f in UltravoxConfig.__dataclass_fields__ if f not in ("audio_config", "text_config", "extra")}
    return UltravoxConfig(
        audio_config=WhisperConfig(**{k: v for k, v in audio.items() if k != "model_type"}),
        text_config=text_config,
        **{k: raw[k] for k in known if k in raw and raw[k] is not None},
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _source(checkpoint: Path, model_id: str) -> str:
    """Where a named sub-model is read from: a folder of that name inside the checkpoint (an offline
    copy), a local folder, or the hub id itself."""
    inside = checkpoint / model_id
    return str(inside) if inside.is_dir() else model_id


class VariableLengthWhisperEncoder(WhisperEncoder):
    """Whisper's encoder for mel inputs up to its window, padded frames masked out."""

    def output_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        return (mel_lengths - 1) // ENCODER_DOWNSAMPLING + 1

    def forward(self, input_features: torch.Tensor, mel_lengths: torch.Tensor | None = None, **kwargs):
        window = self.config.max_source_positions * ENCODER_DOWNSAMPLING
        if input_features.shape[-1] > window:
            raise ValueError(f"mel input of {input_features.shape[-1]} frames exceeds the {window}-frame window")
        frames = input_features.shape[-1]
        if mel_lengths is None:
            mel_lengths = torch.full((input_features.shape[0],), frames, device=input_features.device)
        mel_valid = (torch.arange(frames, device=input_features.device)[None] < mel_lengths[:, None])
        hidden = F.gelu(self.conv1(input_features * mel_valid[:, None]))
        hidden = F.gelu(self.conv2(hidden * mel_valid[:, None]))
        hidden = hidden.permute(0, 2, 1)
        hidden = hidden + self.embed_positions.weight[: hidden.shape[1]]
        lengths = self.output_lengths(mel_lengths)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
        blocked = torch.finfo(hidden.dtype).min
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~valid, blocked)
        mask = mask[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.layer_norm(hidden)


class RMSNorm(nn.Module):
    def __init__(self, size: int, init: float, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), float(init)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class UltravoxProjector(nn.Module):
    """Stack `stack_factor` frames (zero-padding the last group), then the norms and linears."""

    def __init__(self, config: UltravoxConfig):
        super().__init__()
        self.stack_factor = int(config.stack_factor)
        dim_in = config.audio_config.d_model * self.stack_factor
        dim_mid = config.hidden_size // 2 if config.projector_act == "swiglu" else config.hidden_size
        dim_out = config.text_config.hidden_size
        self.ln_pre = RMSNorm(dim_in, config.norm_init)
        self.linear_1 = nn.Linear(dim_in, config.hidden_size, bias=False)
        self.act = SwiGLU() if config.projector_act == "swiglu" else ACT2FN[config.projector_act]
        self.ln_mid = RMSNorm(dim_mid, config.norm_init) if config.projector_ln_mid else nn.Identity()
        self.linear_2 = nn.Linear(dim_mid, dim_out, bias=False)
        self.ln_post = nn.Identity() if config.projector_ln_mid else RMSNorm(dim_out, config.norm_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, frames, width = features.shape
        padded = math.ceil(frames / self.stack_factor) * self.stack_factor
        stacked = F.pad(features, (0, 0, 0, padded - frames)).reshape(batch, padded // self.stack_factor,
                                                                      width * self.stack_factor)
        hidden = self.act(self.linear_1(self.ln_pre(stacked)))
        return self.ln_post(self.linear_2(self.ln_mid(hidden)))


class UltravoxModel(nn.Module):
    """Encoder, projector and LLM under the published module names (audio_tower,
    multi_modal_projector, language_model), so checkpoint keys map one to one."""

    def __init__(self, config: UltravoxConfig):
        super().__init__()
        self.config = config
        self.audio_tower = VariableLengthWhisperEncoder(config.audio_config)
        self.multi_modal_projector = UltravoxProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def audio_embeddings(self, audio_values: torch.Tensor, audio_lens: torch.Tensor) \
            -> tuple[torch.Tensor, torch.Tensor]:
        """Projector output per clip (B, T_max, d) and each clip's number of audio tokens."""
        features = self.audio_tower(audio_values, audio_lens)
        valid = self.audio_tower.output_lengths(audio_lens)
        keep = torch.arange(features.shape[1], device=features.device)[None] < valid[:, None]
        embeds = self.multi_modal_projector(features * keep[..., None])
        tokens = (valid + self.multi_modal_projector.stack_factor - 1) // self.multi_modal_projector.stack_factor
        return embeds, tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_values: torch.Tensor | None = None,
                audio_lens: torch.Tensor | None = None, audio_token_mask: torch.Tensor | None = None, **kwargs):
        embeds = self.get_input_embeddings()(input_ids)
        if audio_values is not None:
            audio, tokens = self.audio_embeddings(audio_values, audio_lens)
            if not torch.equal(audio_token_mask.sum(dim=1), tokens):
                raise ValueError("audio positions in the prompt do not match the audio tokens")
            keep = torch.arange(audio.shape[1], device=audio.device)[None] < tokens[:, None]
            embeds = embeds.masked_scatter(audio_token_mask[..., None], audio[keep].to(embeds.dtype))
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def _safetensors_in(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_weights(folder: Path, rename) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _safetensors_in(folder)
    if not files:
        raise UserError(f"no safetensors weights in {folder}")
    out = {}
    for file in files:
        for key, tensor in load_file(str(file)).items():
            name = rename(key)
            if name is not None:
                out[name] = tensor
    return out


def _local_folder(source: str, hub_kwargs: dict) -> Path:
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"],
                                      **{k: v for k, v in hub_kwargs.items() if k in ("revision", "local_files_only")}))
    except Exception as err:  # noqa: BLE001 - any hub failure is the same user-facing problem
        raise UserError(f"could not get '{source}' (an Ultravox sub-model): {type(err).__name__}. Without hub "
                        f"access, put a copy in a folder named '{source}' inside the checkpoint") from None


def _whisper_encoder_key(key: str) -> str | None:
    """A Whisper (full model) checkpoint key as an audio_tower key; the decoder is not used."""
    for prefix in ("model.encoder.", "encoder."):
        if key.startswith(prefix):
            return PREFIXES["audio"] + key[len(prefix):]
    return None


def checkpoint_folder(checkpoint: str | Path, hub_kwargs: dict) -> Path:
    """A local checkpoint dir as it is, a hub id as its downloaded snapshot."""
    return Path(checkpoint) if Path(checkpoint).is_dir() else _local_folder(str(checkpoint), hub_kwargs)


def load_ultravox(checkpoint: Path, dtype: torch.dtype, hub_kwargs: dict) -> UltravoxModel:
    """The model from a checkpoint folder; parameters in `dtype`, buffers as built (float32)."""
    config = _read_config(checkpoint, hub_kwargs)
    state = _read_weights(checkpoint, lambda key: key)
    unexpected = [k for k in state if not k.startswith(tuple(PREFIXES.values()))]
    if not any(k.startswith(PREFIXES["text"]) for k in state) and config.text_model_id:
        folder = _local_folder(_source(checkpoint, config.text_model_id), hub_kwargs)
        state.update(_read_weights(folder, lambda key: PREFIXES["text"] + key))
    if not any(k.startswith(PREFIXES["audio"]) for k in state) and config.audio_model_id:
        folder = _local_folder(_source(checkpoint, config.audio_model_id), hub_kwargs)
        state.update(_read_weights(folder, _whisper_encoder_key))
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = UltravoxModel(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(unexpected) | (set(state) - expected))
    if missing or unexpected:
        raise UserError(f"Ultravox checkpoint {checkpoint} does not match the architecture: {len(missing)} missing "
                        f"keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    config._commit_hash = checkpoint.name if "snapshots" in checkpoint.parts else None
    return model


@dataclass
class UltravoxProcessor:
    tokenizer: object
    feature_extractor: WhisperFeatureExtractor


class UltravoxFamily(ChatFamily):
    modality = "audio"
    placeholder = "<|audio|>"
    token_inputs = ("input_ids", "attention_mask", "audio_token_mask")

    def _load_model(self):
        self.folder = checkpoint_folder(self.checkpoint, self.hub_kwargs())
        return load_ultravox(self.folder, self.dtype, self.hub_kwargs())

    def _load_processor(self):
        folder = self.folder
        config = self.model.config
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if (folder / "tokenizer_config.json").is_file()
                                                  else _source(folder, config.text_model_id), **self.hub_kwargs())
        tokenizer.padding_side = "right"
        extractor_source = str(folder) if (folder / "preprocessor_config.json").is_file() \
            else _source(folder, config.audio_model_id)
        extractor = WhisperFeatureExtractor.from_pretrained(extractor_source, **self.hub_kwargs())
        return UltravoxProcessor(tokenizer, extractor)

    @property
    def placeholder_id(self) -> int:
        """Ultravox fills the audio positions with end-of-turn ids (their embeddings are replaced)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def window_samples(self) -> int:
        return int(self.processor.feature_extractor.n_samples)

    def sample_problem(self, sample: Sample) -> str | None:
        if sample.audio is not None and sample.audio.shape[0] > self.window_samples:
            return (f"longer than the encoder's {self.window_samples / SAMPLE_RATE:g} s window "
                    "(Ultravox would split it into chunks; skipped, not cut)")
        return None

    def _log_mel(self, wave: np.ndarray) -> torch.Tensor:
        """Whisper log-mel of one clip at its own length (as Ultravox's processor gives it alone)."""
        extractor = self.processor.feature_extractor
        out = extractor([wave], sampling_rate=SAMPLE_RATE, padding="longest", pad_to_multiple_of=extractor.hop_length,
                        truncation=False, return_attention_mask=True, return_tensors="pt")
        return out["input_features"][0, :, : int(out["attention_mask"][0].sum())]

    def prepare(self, samples: list[Sample]) -> Batch:
        shortest = 2 * self.processor.feature_extractor.hop_length
        audio = []
        for sample in samples:
            problem = self.sample_problem(sample)
            if problem:
                raise ValueError(f"sample {sample.id}: {problem}")
            audio.append(np.pad(sample.audio, (0, max(0, shortest - sample.audio.shape[0]))))
        mels = [self._log_mel(wave) for wave in audio]  # alone: a clip's frames never see its batch
        mel_lengths = torch.tensor([m.shape[-1] for m in mels])
        audio_values = torch.zeros((len(mels), mels[0].shape[0], int(mel_lengths.max())))
        for b, mel in enumerate(mels):
            audio_values[b, :, : mel.shape[-1]] = mel
        encoder_lengths = (mel_lengths - 1) // ENCODER_DOWNSAMPLING + 1
        stack = int(self.model.config.stack_factor)
        tokens = (encoder_lengths + stack - 1) // stack
        pre, post = self.prompt_token_parts()
        rows = [pre + [self.placeholder_id] * int(n) + post for n in tokens]
        marks = [[0] * len(pre) + [1] * int(n) + [0] * len(post) for n in tokens]
        batch = pad_token_rows([s.id for s in samples], rows, marks, pad_id=self.pad_token_id)
        batch.inputs.update({"audio_values": audio_values, "audio_lens": mel_lengths,
                             "audio_token_mask": batch.modal_token_mask})
        batch.frame_lengths, batch.encoder_frame_lengths = tokens, encoder_lengths
        return batch
