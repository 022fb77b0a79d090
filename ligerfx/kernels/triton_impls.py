"""Plugs the Triton kernels in behind the ``ligerfx::`` custom ops.

    from ligerfx.kernels import triton_impls
    triton_impls.register()            # CUDA tensors now run the Triton kernels

``register()`` is explicit (nothing registers on import), so the plain-PyTorch reference stays the default until the
package decides otherwise. For CPU tests, ``on_cpu()`` routes CPU tensors through the same kernels under Triton's
interpreter (``TRITON_INTERPRET=1`` must be set before ``triton`` is imported; fp32 only: the interpreter's bf16
``tl.dot`` is wrong, triton#11584)::

    with triton_impls.on_cpu():
        o, hT = torch.ops.ligerfx.gla_fwd(q, k, v, g, None)

Dispatch: ``gla_fwd`` runs the fused recurrent kernel for ``T <= recurrent.MAX_T`` (decode), the chunk kernels
otherwise; the backward pass is always chunked. ``liger_fwd`` is the fused Liger forward (``liger/fused.py``: chunk states, then one chunk-parallel output kernel); ``liger_bwd``
composes the GLA and window backward kernels. ``liger_decode_`` is the fused decode step (``liger/decode.py``).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import ops
from .gla import chunk, recurrent
from .liger import decode, fused
from .swa import window
from .utils import interpreting


def _on_device(fn):
    """Launch on the tensors' CUDA device, not the current one."""
    @functools.wraps(fn)
    def wrapper(q, *args):
        if q.device.type == "cuda":
            with torch.cuda.device(q.device):
                return fn(q, *args)
        return fn(q, *args)
    return wrapper


@_on_device
def gla_fwd(q, k, v, g, h0):
    if q.shape[2] <= recurrent.MAX_T:
        return recurrent.recurrent_gla_fwd(q, k, v, g, h0)
    return chunk.chunk_gla_fwd(q, k, v, g, h0)


IMPLS = {
    "gla_fwd": gla_fwd,
    "gla_bwd": _on_device(chunk.chunk_gla_bwd),
    "swa_fwd": _on_device(window.swa_fwd),
    "swa_bwd": _on_device(window.swa_bwd),
    "liger_fwd": _on_device(fused.liger_fwd),
    "liger_bwd": _on_device(fused.liger_bwd),
    "liger_decode_": _on_device(decode.liger_decode),
}


def register(device: str = "cuda") -> None:
    """Register every Triton kernel for ``device`` ("cuda"; "cpu" only under the interpreter)."""
    if device == "cpu" and not interpreting():
        raise RuntimeError("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    for name, fn in IMPLS.items():
        ops.register_impl(name, device, fn)


@contextlib.contextmanager
def on_cpu():
    """Route CPU tensors through the Triton kernels (interpreter) inside the block, then restore what was there."""
    saved = {name: ops._IMPLS[name].get("cpu") for name in IMPLS}
    register("cpu")
    try:
        yield
    finally:
        for name, fn in saved.items():
            if fn is None:
                ops._IMPLS[name].pop("cpu", None)
            else:
                ops._IMPLS[name]["cpu"] = fn
