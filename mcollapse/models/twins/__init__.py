"""Offline tiny twins of the real model families, built from configs in code.

Tests and smoke runs need checkpoints that load through exactly the same
``from_pretrained`` calls as the real hub models, without network access and in
seconds. Each twin keeps the architecture class, processor class, special
tokens, chat template and the hook-relevant module layout of its real family
(encoder -> projector -> decoder layers -> final norm, with enough decoder layers
for ``llm_layer=16``), and shrinks every width to a few dozen units.

This package imports the families it mirrors; no family imports it.
"""

from mcollapse.models.twins.build import TINY_MODELS, builder_fingerprint, ensure_tiny_checkpoint

__all__ = ["TINY_MODELS", "builder_fingerprint", "ensure_tiny_checkpoint"]
