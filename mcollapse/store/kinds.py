"""Every kind of cached artifact, where it lives under the cache dir, and what keys it.

The one place to look up (or add) a kind: `experiment=cache` lists, verifies and prunes entries
through this table, and the README's cache map is written from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    directory: str  # under the cache dir
    key_fields: tuple[str, ...]
    writer: str
    readers: str
    layout: str  # "dir": one directory per key; "file": one file per key
    base: str = "cache"  # "cache": under paths.cache_dir; "data": under paths.data_root


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("activations", "activations",
         ("model", "source", "checkpoint", "revision", "dtype", "projector", "lora", "input", "dataset", "n", "ids",
          "texts", "hooks", "pooling", "prompt", "window"),
         "extraction.extract", "probe, wasserstein, similarity, layers, lora", "dir"),
    Kind("sequences", "sequences",
         ("model", "source", "checkpoint", "revision", "dtype", "projector", "dataset", "adapter", "window", "role"),
         "extraction.sequences", "lipschitz, modes, gradproj, gmi, ablation, msswap, train_adapter", "dir"),
    Kind("modes", "modes",
         ("sequences", "ids", "text_ids", "n_modes", "ms_threshold", "thresholds", "rho_normalization"),
         "pipeline.decoder_side.modes", "modes, gradproj, ablation, msswap", "file"),
    Kind("gradients", "gradients",
         ("version", "sequences", "ids", "target", "reduction", "batch_size", "modes", "dtype"),
         "pipeline.decoder_side.gradients", "lipschitz, gradproj", "dir"),
    Kind("ablation", "ablation",
         ("sequences", "ids", "basis", "target", "reduction", "plan", "constants", "columns", "batch", "dtype",
          "texts"),
         "experiments.ablation (pipeline.mode_edits; the optimal edit's fitted constants: part optimal_constants)",
         "ablation", "dir"),
    Kind("msswap", "msswap", ("sequences", "ids", "basis", "target", "batch_size"),
         "experiments.msswap (pipeline.mode_edits)", "msswap", "dir"),
    Kind("gmi_scores", "gmi_scores", ("version", "sequences", "input", "ids", "candidates", "texts", "dtype"),
         "experiments.gmi (pipeline.decoder_side.cached_candidate_scores)", "gmi (a re-run or resumed run)", "dir"),
    Kind("lipschitz_summary", "summaries/lipschitz", ("model", "dataset", "fingerprint", "target", "reduction"),
         "lipschitz", "wasserstein (W1 x L), gmi (the bound)", "file"),
    Kind("lora", "lora", ("model", "dataset", "training settings"), "lora", "lora", "dir"),
    Kind("checkpoints", "models", ("builder", "builder fingerprint"),
         "models.twins, models.provision", "every run of a built model", "dir"),
    Kind("datasets", ".", ("generator", "version", "options"), "data.generators", "every run of a synthetic set",
         "dir", base="data"),
    Kind("resolved_models", "resolved",
         ("model config", "hook roles and layer", "device kind", "dtype", "build fingerprint", "lora",
          "library versions"),
         "pipeline.lazy", "probe, extract, wasserstein (a warm re-run loads no model)", "file"),
    Kind("media_digests", "media", ("dataset",), "data.load_records",
         "data.load_records (the dataset fingerprint)", "file"),
    Kind("projectors", "projectors", ("model", "train/dev data", "training settings"), "experiments.train_adapter",
         "train_adapter (resumes; its checkpoints load as model.projector)", "dir"),
    Kind("skip", "skip", ("version", "sequences", "ids", "target", "conditions", "max_new_tokens", "batch"),
         "experiments.skip", "skip", "dir"),
    Kind("layer_tokens", "layer_tokens",
         ("model", "source", "checkpoint", "revision", "dtype", "projector", "lora", "input", "dataset", "n", "ids",
          "texts", "prompt", "window", "max_tokens", "seed"),
         "extraction.layers", "similarity, logit_lens, embedding_map", "file"),
]}
KINDS["variants"] = Kind("variants", "variants", ("dataset", "fingerprint", "ids", "attributes", "version"),
                         "data.variants", "attribute (controlled media variants of each item)", "dir")


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown store kind {name!r}; known: {', '.join(KINDS)}") from None
