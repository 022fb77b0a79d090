"""Capture: find a model's attention modules and trace each one to an ATen-level FX graph with ``torch.export``.

``torch.fx.symbolic_trace`` and the old HF tracer do not work on transformers 5.x (see the notes); Dynamo-based
capture does. We trace one attention module at a time (cheap, no graph breaks, parameters stay attributable to
their ``nn.Linear``) with dynamic batch and sequence dimensions, from a call recorded during a dummy forward.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

PROBE_B, PROBE_T = 3, 11  # dummy batch: distinct from head counts and head dims so shapes are unambiguous
STRICT = False  # non-strict export: Python-level tracing with fake tensors (strict Dynamo mode bakes shapes here, 8x slower)
_DROP = ("attention_mask", "cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class RecordedCall:
    """One call of an attention module: its arguments by name (cache and mask removed)."""
    arguments: dict[str, Any]
    signature: inspect.Signature

    def template(self, dtype=None, device=None) -> dict[str, Any]:
        def cast(x):
            if isinstance(x, torch.Tensor):
                return x.to(device=device or x.device, dtype=dtype if (dtype and x.is_floating_point()) else x.dtype)
            return x
        return pytree.tree_map(cast, self.arguments)


class _Recorder(TorchFunctionMode):
    def __init__(self, stack, hits, length=PROBE_T):
        super().__init__()
        self.stack, self.hits, self.length = stack, hits, length

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:
            name = getattr(func, "__name__", "")
            if name == "scaled_dot_product_attention":
                self.hits.setdefault(self.stack[-1], "sdpa")
            elif name == "softmax":
                x = args[0] if args else kwargs.get("input")
                if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-1] == x.shape[-2] == self.length:
                    self.hits.setdefault(self.stack[-1], "eager")
        return func(*args, **kwargs)


def _bind(module: torch.nn.Module, args, kwargs) -> tuple[dict[str, Any], inspect.Signature]:
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    for p in sig.parameters.values():  # flatten **kwargs into top-level names
        if p.kind is inspect.Parameter.VAR_KEYWORD and p.name in arguments:
            arguments.update(arguments.pop(p.name))
    return arguments, sig


def find_attention(model: torch.nn.Module, batch: int = PROBE_B, length: int = PROBE_T,
                   start: int = 0) -> list[tuple[str, torch.nn.Module, str, RecordedCall]]:
    """Run a dummy forward (``batch`` x ``length`` tokens at positions ``start .. start + length - 1``) and return
    ``(path, module, kind, call)`` for every module that computes softmax attention itself (the innermost module
    active when SDPA, or a [T, T] softmax, runs), in execution order."""
    name_of = {m: n for n, m in model.named_modules()}
    stack, hits, calls, order = [], {}, {}, []

    def pre(mod, args, kwargs):
        stack.append(mod)
        if mod not in calls:
            calls[mod] = (args, kwargs)
            order.append(mod)

    def post(mod, args, kwargs, out):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in model.modules()]
    vocab = getattr(model.config, "vocab_size", 100) or 100
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(4, vocab - 1), min(vocab, 1000), (batch, length), generator=g)
    device = next(model.parameters()).device
    ids = ids.to(device)
    try:
        with torch.no_grad(), _Recorder(stack, hits, length):
            pos = torch.arange(start, start + length, device=device).expand(batch, length)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for mod in order:
        if mod in hits:
            args, kwargs = calls[mod]
            arguments, sig = _bind(mod, args, kwargs)
            for k in _DROP:
                if k in arguments:
                    arguments[k] = None
            out.append((name_of[mod], mod, hits[mod], RecordedCall(arguments, sig)))
    return out


class _Call(torch.nn.Module):
    """Calls ``attn`` with the recorded argument structure, taking the tensors positionally."""

    def __init__(self, attn, arguments):
        super().__init__()
        self.attn = attn
        self.leaves, self.spec = pytree.tree_flatten(arguments)
        self.tidx = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]

    def forward(self, *flat):
        leaves = list(self.leaves)
        for i, t in zip(self.tidx, flat):
            leaves[i] = t
        # the class forward: the instance may already carry the ligerfx forward (re-capture for a new dtype)
        return type(self.attn).forward(self.attn, **pytree.tree_unflatten(leaves, self.spec))


def export_attention(module: torch.nn.Module, arguments: dict[str, Any]):
    """``torch.export`` of one attention call with dynamic batch/sequence dims.

    Returns ``(exported_program, input_paths)``; ``input_paths[i]`` is the pytree key path (in ``arguments``) of the
    i-th user input of the graph."""
    call = _Call(module, arguments)
    flat = [call.leaves[i] for i in call.tidx]
    paths = [p for p, x in pytree.tree_flatten_with_path(arguments)[0] if isinstance(x, torch.Tensor)]
    dims = tuple({d: torch.export.Dim.AUTO for d in range(min(2, t.dim()))} for t in flat)
    was_training = module.training
    module.eval()
    try:
        with contextlib.redirect_stderr(None) if False else contextlib.nullcontext():
            ep = torch.export.export(call, tuple(flat), dynamic_shapes=(dims,), strict=STRICT)
    finally:
        module.train(was_training)
    return ep, paths


def at_position(model: torch.nn.Module, position: int) -> dict[int, dict[str, Any]]:
    """Every attention module's tensor arguments for one token at ``position`` (``id(module)`` -> arguments): the
    positional inputs (cos/sin rows ``[1, 1, D]``, position ids ``[[position]]``) as the model computes them there.
    One forward of a single token, whatever ``position`` is."""
    return {id(m): pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else None, c.arguments)
            for _, m, _, c in find_attention(model, 1, 1, start=position)}
