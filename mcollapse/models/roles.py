"""Resolve hook roles to modules on a loaded model, by structure rather than by path strings.

transformers moves module paths between major versions (Qwen2-Audio's LLM layers went from
`language_model.model.layers.N` to `model.language_model.layers.N`), so roles are found from
what the modules are: the decoder stack is the ModuleList of blocks that sits beside the final
norm in the text backbone; the adapter is the modality projector; the encoder output is what the
encoder hands that projector (its input), which is also right for LLaVA, whose projector reads
penultimate-layer patch features rather than the vision tower's pooled output.
An explicit `model.hook_paths.<role>` (dotted path; suffix `@input` to capture a module's input)
always wins.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from mcollapse.errors import UserError


@dataclass(frozen=True)
class HookTarget:
    """Where a role is captured: a module path, and whether its input or output is taken."""

    role: str
    name: str  # column name in results: encoder_output, adapter_output, llm_layer_16, llm_final
    path: str
    capture: str  # "output" | "input"


class HookResolutionError(UserError):
    pass


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise KeyError("module not inside model")


def find_text_backbone(model: nn.Module) -> nn.Module:
    """The text decoder stack: a module with a `layers` ModuleList and a final `norm`."""
    candidates = []
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and isinstance(getattr(module, "norm", None), nn.Module):
            if getattr(module, "embed_tokens", None) is not None:
                candidates.append(module)
    if not candidates:
        raise HookResolutionError("no text decoder stack (layers + norm + embed_tokens) found")
    return max(candidates, key=lambda m: len(m.layers))


def find_adapter(model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module]:
    named = _named(model)
    for wanted in names:
        matches = [p for p in named if p.split(".")[-1] == wanted]
        if matches:
            path = min(matches, key=len)
            return path, named[path]
    raise HookResolutionError(f"no modality projector named one of {names}")


def _nearby(model: nn.Module, hint: str, limit: int = 8) -> str:
    names = [n for n in _named(model) if n]
    close = difflib.get_close_matches(hint, names, n=limit, cutoff=0.3)
    if not close:
        close = [n for n in names if n.count(".") <= 2][:limit]
    return ", ".join(close)


def hook_name(role: str, llm_layer: int) -> str:
    return f"llm_layer_{llm_layer}" if role == "llm_layer" else role


def resolve_hooks(
    model: nn.Module,
    roles: tuple[str, ...] | list[str],
    llm_layer: int,
    overrides: dict | None = None,
    adapter_names: tuple[str, ...] = ("multi_modal_projector", "projector"),
) -> list[HookTarget]:
    """Map each requested role to a HookTarget, or stop with a message naming nearby modules."""
    overrides = dict(overrides or {})
    named = _named(model)
    targets = []
    for role in roles:
        name = hook_name(role, llm_layer)
        explicit = overrides.get(role)
        if explicit:
            path, _, capture = str(explicit).partition("@")
            capture = capture or "output"
            if path not in named or capture not in ("input", "output"):
                raise HookResolutionError(
                    f"hook '{role}' path '{explicit}' does not exist on the model; "
                    f"nearby modules: {_nearby(model, path)}"
                )
            targets.append(HookTarget(role, name, path, capture))
            continue
        try:
            targets.append(_resolve_role(model, role, name, llm_layer, adapter_names))
        except HookResolutionError as err:
            raise HookResolutionError(
                f"hook '{role}' does not resolve ({err}); set model.hook_paths.{role}=<module path>; "
                f"nearby modules: {_nearby(model, role.replace('_output', ''))}"
            ) from None
    return targets


def _resolve_role(model, role, name, llm_layer, adapter_names) -> HookTarget:
    if role in ("llm_layer", "llm_final"):
        backbone = find_text_backbone(model)
        if role == "llm_final":
            return HookTarget(role, name, _path_of(model, backbone.norm), "output")
        n_layers = len(backbone.layers)
        index = llm_layer if llm_layer >= 0 else n_layers + llm_layer
        if not 0 <= index < n_layers:
            raise HookResolutionError(f"llm_layer {llm_layer} is out of range: the LLM has {n_layers} layers")
        return HookTarget(role, name, _path_of(model, backbone.layers[index]), "output")
    path, _ = find_adapter(model, adapter_names)
    if role == "adapter_output":
        return HookTarget(role, name, path, "output")
    if role == "encoder_output":
        return HookTarget(role, name, path, "input")
    raise HookResolutionError(f"unknown role '{role}'")


@dataclass(frozen=True)
class BlockParts:
    """The sub-modules of a pre-norm decoder block (Llama-like: x + attn(ln1 x), then + mlp(ln2 .)),
    found by what they are: the attention is the child holding q/k/v/o projections, the MLP the child
    holding the feed-forward projections, the norms the two norm children in registration order."""

    input_norm: nn.Module
    attention: nn.Module
    post_norm: nn.Module
    mlp: nn.Module


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The LLM's decoder blocks, in order."""
    return find_text_backbone(model).layers


def block_parts(block: nn.Module) -> BlockParts:
    children = list(block.named_children())
    attention = [m for _, m in children if all(isinstance(getattr(m, n, None), nn.Linear) for n in ATTENTION_LINEARS)]
    mlp = [m for _, m in children if isinstance(getattr(m, "down_proj", None), nn.Linear)]
    norms = [m for _, m in children if "norm" in type(m).__name__.lower()]
    if len(attention) != 1 or len(mlp) != 1 or len(norms) != 2:
        raise HookResolutionError(f"block {type(block).__name__} is not a pre-norm attention + MLP block "
                                  f"(children: {', '.join(n for n, _ in children)})")
    return BlockParts(norms[0], attention[0], norms[1], mlp[0])


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by short name: q, k, v, o, gate, up, down (those it has)."""
    parts = block_parts(block)
    found = {}
    for owner, names in ((parts.attention, ATTENTION_LINEARS), (parts.mlp, MLP_LINEARS)):
        for name in names:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Linear):
                found[name.removesuffix("_proj")] = module
    return found


def hidden_state_name(index: int) -> str:
    """The hook name of `hidden_states[index]` (0: the LLM input)."""
    return f"llm_hs_{index}"


def n_hidden_states(model: nn.Module) -> int:
    """L + 1: the LLM input, then one per block (the last after the final norm, as transformers)."""
    return len(find_text_backbone(model).layers) + 1


def layer_indices(model: nn.Module, wanted) -> list[int]:
    """`wanted` ("all" or a list of hidden_states indices, negative from the end) as sorted indices."""
    total = n_hidden_states(model)
    if isinstance(wanted, str):
        if wanted != "all":
            raise HookResolutionError(f"hook.llm_layers '{wanted}' is not 'all' or a list of indices")
        return list(range(total))
    indices = []
    for value in wanted:
        index = int(value) if int(value) >= 0 else total + int(value)
        if not 0 <= index < total:
            raise HookResolutionError(f"hook.llm_layers index {value} is out of range 0..{total - 1}")
        indices.append(index)
    return sorted(set(indices))


def resolve_hidden_states(model: nn.Module, wanted) -> list[HookTarget]:
    """A target per `hidden_states` index, read by the hooks of one forward pass: index 0 is the
    first block's input (the LLM input embeddings, media already spliced in), index i the output of
    block i-1, and the last index the final norm's output, which is what transformers returns there."""
    backbone = find_text_backbone(model)
    n_blocks = len(backbone.layers)
    targets = []
    for index in layer_indices(model, wanted):
        if index == 0:
            path, capture = _path_of(model, backbone.layers[0]), "input"
        elif index == n_blocks:
            path, capture = _path_of(model, backbone.norm), "output"
        else:
            path, capture = _path_of(model, backbone.layers[index - 1]), "output"
        targets.append(HookTarget("llm_hidden", hidden_state_name(index), path, capture))
    return targets
