"""Liger attention, as in the paper (Lan et al., "Liger: Linearizing LLMs to Gated Recurrent Structures",
arXiv 2503.01496) and its official code. This file is the only place the method's math lives.

For one attention layer, with the model's own projections (no new parameters)::

    q, k, v       = W_q x, W_k x, W_v x          (+ the model's q/k norms; pre-RoPE; per head)
    phi(.)        = softmax over the head dimension          (feature map of the recurrent branch)
    log a_t       = logsigmoid(k_t) / gate_normalizer        (gate from the key projection; "pooling" = identity)
    S_t           = diag(a_t) S_{t-1} + phi(k_t)^T v_t       (GLA state, fp32, one per KV head)
    o_gla_t       = phi(q_t) S_t                             (scale 1, no normaliser)
    o_swa_t       = softmax attention of RoPE(q_t) over RoPE(k_j), t - window <= j <= t, model's scale
    o_t           = mix * o_gla_t + (1 - mix) * o_swa_t      -> the model's own output projection

Design choices (see ``LigerConfig``): the window sees the query itself plus ``window`` previous tokens (65 keys for
64, like the official code); the gate reads the key projection *before* any k-norm and *with* LoRA, so a LoRA on
``k_proj`` changes the gate; the state is kept per KV head (the official code repeats it to every query head, an
identical but ``HQ/HKV`` times larger state). Padded tokens neither write nor decay the state (their k, v and gate
are zeroed) and are never attended to. ``variant="swa_sinks"`` drops the recurrent branch and keeps the first
``sinks`` tokens visible: the training-free sliding-window baseline.

A decode step (one token per sequence onto an allocated cache, autograd off) runs as one fused op
(``decode_step``: ``ligerfx::liger_decode_``) instead of the branch-by-branch path; ``LIGERFX_FUSED_DECODE=0``
(read at import, or set ``ligerfx.liger.FUSED_DECODE = False``) keeps the branch-by-branch path for every call.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .config import LigerConfig
from . import ops

FUSED_DECODE = os.environ.get("LIGERFX_FUSED_DECODE", "1") != "0"


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi: softmax over the head dimension, in fp32."""
    return torch.softmax(x.float(), dim=-1)


def log_gate(k_proj: torch.Tensor, normalizer: float) -> torch.Tensor:
    """log a_t = logsigmoid(k_t) / normalizer, elementwise on the key projection (per key channel)."""
    return F.logsigmoid(k_proj.float()) / normalizer


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    """dtype the attention matmuls run in: autocast's when it is on (what it gives the SDPA we replace), else the
    model's (that of ``v``). Feature maps and gates are computed in fp32 and then cast; the state stays fp32."""
    if torch.is_autocast_enabled(v.device.type):
        return torch.get_autocast_dtype(v.device.type)
    return v.dtype


def gla_branch(q, k, v, gate_src, cfg: LigerConfig, valid: Optional[torch.Tensor], h0: Optional[torch.Tensor]):
    """Recurrent branch. q: [B, HQ, T, K], k/gate_src: [B, HKV, T, K], v: [B, HKV, T, V] -> (o fp32, state fp32).

    phi(q), phi(k) and v enter the kernel in the compute dtype (bf16 under autocast or for a bf16 model: tensor-core
    matmuls); the gate (its cumulative sum) and the state are fp32."""
    cd = compute_dtype(v)
    phi_q, phi_k, g = feature_map(q), feature_map(k), log_gate(gate_src, cfg.gate_normalizer)
    if valid is not None:  # padded tokens write nothing (k = v = 0) and decay nothing (g = 0)
        m = valid[:, None, :, None]
        phi_k, v, g = phi_k * m, v * m, g * m
    return ops.gla_fwd(phi_q.to(cd), phi_k.to(cd), v.to(cd), g, h0)


def swa_branch(q, k, v, q_pos, k_pos, scale: float, cfg: LigerConfig):
    """Window branch on RoPE'd q/k: each query sees itself and ``cfg.window`` previous tokens (+ sinks), in the
    compute dtype (models that upcast q/k in their norms hand us fp32 q/k even under bf16 autocast)."""
    cd = compute_dtype(v)
    o, _ = ops.swa_fwd(q.to(cd), k.to(cd), v.to(cd), q_pos, k_pos, float(scale), int(cfg.window),
                       int(cfg.n_sinks))
    return o


def mix(o_gla: Optional[torch.Tensor], o_swa: Optional[torch.Tensor], cfg: LigerConfig, dtype: torch.dtype):
    w = cfg.recurrent_weight
    if o_swa is None:
        return o_gla.to(dtype)
    if o_gla is None:
        return o_swa.to(dtype)
    return (w * o_gla + (1.0 - w) * o_swa.float()).to(dtype)


def positions(valid: Optional[torch.Tensor], B: int, T: int, device, start: Optional[torch.Tensor] = None):
    """Per-sequence position of each new token among the *valid* tokens (``-1`` for padding)."""
    if valid is None:
        pos = torch.arange(T, device=device).expand(B, T)
    else:
        pos = valid.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    if valid is not None:
        pos = pos.masked_fill(~valid, -1)
    return pos


def liger_attention(q_pre, k_pre, v, gate_src, q_rope, k_rope, *, scale: float, cfg: LigerConfig,
                    valid: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
    """Liger attention for one layer. Shapes as SDPA sees them ([B, H, T, D]); returns [B, HQ, T, V].

    ``cache`` (a ``ligerfx.cache.LigerLayer``) carries the GLA state and the window of past keys/values between
    calls (prefill, then decode steps); it is read before and updated in place after this call. A decode step
    without autograd takes ``decode_step`` (unless ``LIGERFX_FUSED_DECODE=0``).
    """
    B, _, T, _ = q_rope.shape
    if cache is not None:
        cache.prepare(k_rope, v)
        if FUSED_DECODE and T == 1 and cache.seen is not None and not torch.is_grad_enabled():
            return decode_step(q_pre, k_pre, v, gate_src, q_rope, k_rope, scale=scale, cfg=cfg, valid=valid,
                               cache=cache)
    o_gla = o_swa = None
    if cfg.recurrent_weight > 0:
        o_gla, state = gla_branch(q_pre, k_pre, v, gate_src, cfg, valid,
                                  cache.initial_state() if cache is not None else None)
        if cache is not None:
            cache.update_state(state)
    start = cache.seen if cache is not None else None
    q_pos = positions(valid, B, T, q_rope.device, start)
    if cfg.recurrent_weight < 1:
        if cache is not None:
            keys, values, k_pos = cache.window_keys(k_rope, v, q_pos)
        else:
            keys, values, k_pos = k_rope, v, q_pos
        o_swa = swa_branch(q_rope, keys, values, q_pos, k_pos, scale, cfg)
    if cache is not None:
        cache.advance(k_rope, v, q_pos)
    return mix(o_gla, o_swa, cfg, v.dtype)


def decode_step(q_pre, k_pre, v, gate_src, q_rope, k_rope, *, scale: float, cfg: LigerConfig,
                valid: Optional[torch.Tensor], cache) -> torch.Tensor:
    """``liger_attention`` for one new token per sequence (T == 1) onto an allocated ``cache``, autograd off: the
    same math in one op (``ligerfx::liger_decode_``: feature maps, gate, state update, window over the sinks, the
    ring and the token itself, mix, then the token's ring and sink writes, all in place), then the counters. A
    missing branch (``swa_sinks``: no state; ``mix=1``: no ring) is skipped inside the op. Differences from the
    branch-by-branch path: the feature maps and the window branch's output are not rounded to the compute dtype
    before the state update and the mix (fp32 throughout)."""
    pos = positions(valid, q_rope.shape[0], 1, q_rope.device, cache.seen)
    o = ops.liger_decode_(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, cache.state, cache.win_k, cache.win_v,
                          cache.win_pos, cache.sink_k, cache.sink_v, cache.sink_pos, float(scale), int(cfg.window),
                          float(cfg.recurrent_weight), float(cfg.gate_normalizer))
    cache.count((pos >= 0).sum(1), 1)
    return o
