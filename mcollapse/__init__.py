"""mcollapse: measure modality collapse in multimodal LLMs."""

__version__ = "0.1.0"
