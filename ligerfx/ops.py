"""The ``ligerfx::`` custom ops: the interface between the passes and the kernels.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so ``torch.compile`` and
``torch.export`` see through it without running it, and an autograd formula whose backward is its own op (except
the inference-only decode step ``liger_decode_``, which instead declares the cache buffers it updates in place in
``mutates_args``, so functionalisation and dead-code elimination keep the writes).
The default implementation is the plain-PyTorch reference in ``ligerfx/kernels/*/naive.py``; device kernels
(Triton) register themselves with ``register_impl(op_name, device, fn)`` and are picked at call time.

    ligerfx::gla_fwd(q, k, v, g, h0?)                -> (o, hT)
    ligerfx::gla_bwd(q, k, v, g, h0?, do, dhT?)      -> (dq, dk, dv, dg, dh0)
    ligerfx::swa_fwd(q, k, v, q_pos, k_pos, scale, window, sinks)          -> (o, lse)
    ligerfx::swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, scale, window, sinks, dlse) -> (dq, dk, dv)
    ligerfx::liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos?, h0?, scale, window, mix, gate_normalizer)
        -> (o, hT, lse)
    ligerfx::liger_bwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos?, h0?, lse, do, dhT?, scale, window, mix,
                       gate_normalizer) -> (dq_pre, dk_pre, dv, dgate_src, dq_rope, dk_rope, dh0)
    ligerfx::liger_decode_(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state?, win_k?, win_v?, win_pos?,
                           sink_k?, sink_v?, sink_pos?, win_kp?, win_gs?, scale, window, mix, gate_normalizer,
                           q_sink?) -> o
        (one decode step; updates state, ring and sink buffers in place; no autograd)

Shapes and semantics are documented in ``kernels/gla/naive.py``, ``kernels/swa/naive.py`` and
``kernels/liger/naive.py`` (the whole Liger attention of one layer, no cache, no sinks: one fused forward kernel;
and ``liger_decode``, one decode step onto a ``LigerLayer``'s buffers).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels.gla import naive as gla_naive
from .kernels.liger import naive as liger_naive
from .kernels.swa import naive as swa_naive

# op name -> device type -> implementation. Filled by the Triton kernel modules when they import.
_IMPLS: dict[str, dict[str, Callable]] = {
    "gla_fwd": {}, "gla_bwd": {}, "swa_fwd": {}, "swa_bwd": {}, "liger_fwd": {}, "liger_bwd": {},
    "liger_decode_": {},
}
_REFERENCE = {
    "gla_fwd": gla_naive.gla_fwd,
    "gla_bwd": gla_naive.gla_bwd_chunked,
    "swa_fwd": swa_naive.swa_fwd,
    "swa_bwd": swa_naive.swa_bwd,
    "liger_fwd": liger_naive.liger_fwd,
    "liger_bwd": liger_naive.liger_bwd,
    "liger_decode_": liger_naive.liger_decode,
}
_FORCE_REFERENCE = False


def register_impl(op: str, device: str, fn: Callable) -> None:
    """Plug a device kernel in behind ``ligerfx::<op>``."""
    _IMPLS[op][device] = fn


class reference_kernels:
    """Context manager forcing the plain-PyTorch reference for every op (debugging, parity tests)."""

    def __enter__(self):
        global _FORCE_REFERENCE
        self._prev, _FORCE_REFERENCE = _FORCE_REFERENCE, True

    def __exit__(self, *exc):
        global _FORCE_REFERENCE
        _FORCE_REFERENCE = self._prev


def _impl(op: str, x: Tensor) -> Callable:
    if not _FORCE_REFERENCE:
        fn = _IMPLS[op].get(x.device.type)
        if fn is not None:
            return fn
    return _REFERENCE[op]


def _new(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------------------- GLA
@torch.library.custom_op("ligerfx::gla_fwd", mutates_args=())
def gla_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    o, hT = _impl("gla_fwd", q)(q, k, v, g, h0)
    return o.contiguous(), hT.contiguous()


@gla_fwd.register_fake
def _(q, k, v, g, h0):
    B, HQ, T, K = q.shape
    return q.new_empty(B, HQ, T, v.shape[-1], dtype=torch.float32), q.new_empty(
        B, k.shape[1], K, v.shape[-1], dtype=torch.float32
    )


@torch.library.custom_op("ligerfx::gla_bwd", mutates_args=())
def gla_bwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Optional[Tensor], do: Tensor, dhT: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _impl("gla_bwd", q)(q, k, v, g, h0, do, dhT)
    return tuple(x.contiguous() for x in grads)


@gla_bwd.register_fake
def _(q, k, v, g, h0, do, dhT):
    B, HKV, K, V = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    # contiguous, like the real outputs (empty_like would copy a transposed input's strides)
    return (_new(q), _new(k), _new(v), _new(g), q.new_empty(B, HKV, K, V, dtype=torch.float32))


def _gla_setup(ctx, inputs, output):
    q, k, v, g, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(q, k, v, g, h0)


def _gla_backward(ctx, do, dhT):
    q, k, v, g, h0 = ctx.saved_tensors
    dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, h0, do, dhT)
    return dq, dk, dv, dg, (dh0 if ctx.has_h0 else None)


gla_fwd.register_autograd(_gla_backward, setup_context=_gla_setup)


# ---------------------------------------------------------------------------------------------------------- SWA
@torch.library.custom_op("ligerfx::swa_fwd", mutates_args=())
def swa_fwd(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, window: int, sinks: int
) -> tuple[Tensor, Tensor]:
    o, lse = _impl("swa_fwd", q)(q, k, v, q_pos, k_pos, scale, window, sinks)
    return o.contiguous(), lse.contiguous()


@swa_fwd.register_fake
def _(q, k, v, q_pos, k_pos, scale, window, sinks):
    B, HQ, TQ, _ = q.shape
    return q.new_empty(B, HQ, TQ, v.shape[-1]), q.new_empty(B, HQ, TQ, dtype=torch.float32)


@torch.library.custom_op("ligerfx::swa_bwd", mutates_args=())
def swa_bwd(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    scale: float, window: int, sinks: int, dlse: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _impl("swa_bwd", q)(q, k, v, q_pos, k_pos, o, lse, do, scale, window, sinks, dlse)
    return tuple(x.contiguous() for x in grads)


@swa_bwd.register_fake
def _(q, k, v, q_pos, k_pos, o, lse, do, scale, window, sinks, dlse=None):
    return _new(q), _new(k), _new(v)


def _swa_setup(ctx, inputs, output):
    q, k, v, q_pos, k_pos, scale, window, sinks = inputs
    o, lse = output
    ctx.args = (scale, window, sinks)
    ctx.save_for_backward(q, k, v, q_pos, k_pos, o, lse)


def _swa_backward(ctx, do, dlse):
    q, k, v, q_pos, k_pos, o, lse = ctx.saved_tensors
    dq, dk, dv = swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, *ctx.args, dlse)
    return dq, dk, dv, None, None, None, None, None


swa_fwd.register_autograd(_swa_backward, setup_context=_swa_setup)


# ------------------------------------------------------------------------------------------- Liger (fused)
@torch.library.custom_op("ligerfx::liger_fwd", mutates_args=())
def liger_fwd(
    q_pre: Tensor, k_pre: Tensor, v: Tensor, gate_src: Tensor, q_rope: Tensor, k_rope: Tensor, pos: Optional[Tensor],
    h0: Optional[Tensor], scale: float, window: int, mix: float, gate_normalizer: float,
) -> tuple[Tensor, Tensor, Tensor]:
    o, hT, lse = _impl("liger_fwd", v)(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix,
                                        gate_normalizer)
    return o.contiguous(), hT.contiguous(), lse.contiguous()


@liger_fwd.register_fake
def _(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix, gate_normalizer):
    B, HQ, T, K = q_pre.shape
    HKV, V = k_pre.shape[1], v.shape[-1]
    return (v.new_empty(B, HQ, T, V), v.new_empty(B, HKV, K, V, dtype=torch.float32),
            v.new_empty(B, HQ, T, dtype=torch.float32))


@torch.library.custom_op("ligerfx::liger_bwd", mutates_args=())
def liger_bwd(
    q_pre: Tensor, k_pre: Tensor, v: Tensor, gate_src: Tensor, q_rope: Tensor, k_rope: Tensor, pos: Optional[Tensor],
    h0: Optional[Tensor], lse: Tensor, do: Tensor, dhT: Optional[Tensor], scale: float, window: int, mix: float,
    gate_normalizer: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _impl("liger_bwd", v)(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, scale, window,
                                  mix, gate_normalizer)
    return tuple(x.contiguous() for x in grads)


@liger_bwd.register_fake
def _(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, scale, window, mix, gate_normalizer):
    B, HKV, K, V = k_pre.shape[0], k_pre.shape[1], k_pre.shape[-1], v.shape[-1]
    return (_new(q_pre), _new(k_pre), _new(v), _new(gate_src), _new(q_rope), _new(k_rope),
            v.new_empty(B, HKV, K, V, dtype=torch.float32))


def _liger_setup(ctx, inputs, output):
    q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix, gate_normalizer = inputs
    ctx.args = (scale, window, mix, gate_normalizer)
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, output[2])


def _liger_backward(ctx, do, dhT, dlse):
    """lse is not differentiable (its gradient is ignored)."""
    q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse = ctx.saved_tensors
    grads = liger_bwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, *ctx.args)
    return (*grads[:6], None, grads[6] if ctx.has_h0 else None, None, None, None, None)


liger_fwd.register_autograd(_liger_backward, setup_context=_liger_setup)


# ------------------------------------------------------------------------------------------- Liger (decode)
@torch.library.custom_op(
    "ligerfx::liger_decode_",
    mutates_args=("state", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos", "win_kp", "win_gs"))
def liger_decode_(
    q_pre: Tensor, k_pre: Tensor, v: Tensor, gate_src: Tensor, q_rope: Tensor, k_rope: Tensor, pos: Tensor,
    state: Optional[Tensor], win_k: Optional[Tensor], win_v: Optional[Tensor], win_pos: Optional[Tensor],
    sink_k: Optional[Tensor], sink_v: Optional[Tensor], sink_pos: Optional[Tensor], win_kp: Optional[Tensor],
    win_gs: Optional[Tensor], scale: float, window: int, mix: float, gate_normalizer: float,
    q_sink: Optional[Tensor] = None,
) -> Tensor:
    """One decode step onto a cache's buffers, in place (``kernels/liger/naive.py::liger_decode``; ``win_kp`` and
    ``win_gs`` given: the complementary variant's step). Inference only: no autograd formula.

    Every buffer it writes comes before the scalars, without a default: torch 2.11 drops trailing arguments equal to
    their default before ``ADInplaceOrView`` indexes the mutated ones (an ``IndexError`` there)."""
    o = _impl("liger_decode_", v)(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos,
                                   sink_k, sink_v, sink_pos, scale, window, mix, gate_normalizer, q_sink, win_kp,
                                   win_gs)
    return o.contiguous()


@liger_decode_.register_fake
def _(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos, sink_k, sink_v, sink_pos, win_kp,
      win_gs, scale, window, mix, gate_normalizer, q_sink=None):
    B, HQ = q_pre.shape[:2]
    return v.new_empty(B, HQ, 1, v.shape[-1])


def _register_triton_kernels() -> None:
    """Triton kernels behind the ops on CUDA (the CPU keeps the reference; tests run the kernels on CPU through
    ``ligerfx.kernels.triton_impls.on_cpu()`` under ``TRITON_INTERPRET=1``)."""
    try:
        from .kernels import triton_impls
    except ImportError:  # no triton on this platform
        return
    triton_impls.register("cuda")


_register_triton_kernels()
