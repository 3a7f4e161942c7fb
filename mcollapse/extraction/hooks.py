"""Capture every configured hook in one forward pass, and stop the pass once all have fired.

Stopping early skips what no hook needs (the LM head over the whole vocabulary, or the whole
LLM when only encoder-side hooks are asked for). A module that fires more than once per
forward keeps its first output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from mcollapse.models.roles import HookTarget


class _AllHooksFired(Exception):
    """Raised inside the forward pass to leave it once nothing more is needed."""


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"hook captured a {type(value).__name__}, not a tensor")


@contextmanager
def _registered(model: nn.Module, targets: Iterable[HookTarget], store: dict, expected: set[str]):
    named = dict(model.named_modules())
    handles = []

    def make(target: HookTarget):
        def keep(tensor):
            if target.name not in store:
                store[target.name] = tensor.detach()
            if expected and expected.issubset(store):
                raise _AllHooksFired

        if target.capture == "input":
            def pre_hook(_module, args, kwargs):
                value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                keep(_first_tensor(value))

            return named[target.path].register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(_module, _args, output):
            keep(_first_tensor(output))

        return named[target.path].register_forward_hook(post_hook)

    try:
        for target in targets:
            handles.append(make(target))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, targets: list[HookTarget], forward: Callable[[], object]
) -> dict[str, torch.Tensor]:
    """Run `forward()` once with hooks on `targets`; return {target.name: tensor}.

    Raises RuntimeError naming the hooks that did not fire (e.g. an encoder hook on text input).
    """
    store: dict[str, torch.Tensor] = {}
    expected = {t.name for t in targets}
    with _registered(model, targets, store, expected), torch.no_grad():
        try:
            forward()
        except _AllHooksFired:
            pass
    missing = expected - set(store)
    if missing:
        raise RuntimeError(f"hooks did not fire during the forward pass: {sorted(missing)}")
    return store


@contextmanager
def edited(hooks: Iterable[tuple[nn.Module, str, Callable]]):
    """Edit a forward pass: `(module, "pre" | "post", fn)` per hook, registered with kwargs and removed
    on exit. A pre-hook `fn(module, args, kwargs)` may return new `(args, kwargs)`; a post-hook
    `fn(module, args, kwargs, output)` may return a new output (None keeps them as they are)."""
    handles = []
    try:
        for module, when, fn in hooks:
            if when == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif when == "post":
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"hook kind must be 'pre' or 'post', got {when!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaced_at(model: nn.Module, target: HookTarget, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the tensor at `target` (a module's output, or its first input for `capture="input"`)
    with `fn(tensor)` during the forward passes run inside the block (through `edited`)."""
    module = dict(model.named_modules())[target.path]

    def pre_hook(_module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        name = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, name: fn(kwargs[name])}

    def post_hook(_module, _args, _kwargs, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        raise TypeError(f"cannot edit a {type(output).__name__} output")

    with edited([(module, "pre", pre_hook) if target.capture == "input" else (module, "post", post_hook)]):
        yield
