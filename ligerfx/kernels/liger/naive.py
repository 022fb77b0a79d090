"""Plain-PyTorch Liger attention (recurrent + window branch in one call): the reference for the fused kernel.

Shapes (head-first, as SDPA sees them; ``K`` the q/k head dim, ``V`` the value head dim)::

    q_pre, q_rope: [B, HQ, T, K]   k_pre, gate_src, k_rope: [B, HKV, T, K]   v: [B, HKV, T, V]
    pos: [B, T] int64 (-1 = padding) or None (every token valid, positions 0..T-1)   h0, hT: [B, HKV, K, V] fp32

    liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix, gate_normalizer)
        -> o [B, HQ, T, V] (v's dtype), hT fp32, lse [B, HQ, T] fp32 (window branch; -inf where no key is seen)
    liger_bwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, scale, window, mix,
              gate_normalizer) -> dq_pre, dk_pre, dv, dgate_src, dq_rope, dk_rope (input dtypes), dh0 fp32

The math is ``ligerfx/liger.py``'s (no cache, no sinks)::

    phi_q, phi_k = softmax(q_pre), softmax(k_pre) over the head dim (fp32)
    g            = logsigmoid(gate_src) / gate_normalizer (fp32)
    padded tokens (pos < 0): phi_k = v = g = 0 in the recurrent branch (no write, no decay), never attended to
    o_gla, hT    = GLA(phi_q, phi_k, v, g, h0)                                   (scale 1, state per KV head)
    o_swa, lse   = window softmax attention of q_rope over k_rope, v: key j visible to query t iff
                   pos_j >= 0, pos_t >= 0 and 0 <= pos_t - pos_j <= window; ``scale`` the model's
    o            = mix * o_gla + (1 - mix) * o_swa

v's dtype is the compute dtype, as ``liger.compute_dtype`` (autocast's, else the model's; callers cast v to it):
the window branch runs on q_rope, k_rope cast to it, the recurrent branch's matmul operands (phi_q, phi_k, v) are
in it, the gate and the state are fp32, o has it. q_pre, k_pre and gate_src may have any float dtype.

The backward pass differentiates through the feature maps and the gate by hand (softmax and logsigmoid
derivatives) around the backward kernels of the two branches, which it takes as arguments (default: the naive
references), so the Triton twin (``fused.py``) reuses it with its own kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..gla import naive as gla_naive
from ..swa import naive as swa_naive


def positions(pos: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    """``pos`` or, for None, 0..T-1 in every row."""
    if pos is not None:
        return pos.to(torch.int64)
    return torch.arange(T, device=device).expand(B, T)


def features(q_pre, k_pre, gate_src, gate_normalizer: float):
    """phi_q, phi_k (softmax over the head dim) and the log gate, fp32."""
    return (torch.softmax(q_pre.float(), -1), torch.softmax(k_pre.float(), -1),
            F.logsigmoid(gate_src.float()) / gate_normalizer)


def padding_mask(pos):
    """[B, 1, T, 1] fp32 validity of the tokens (None without positions: all valid)."""
    return None if pos is None else (pos >= 0)[:, None, :, None].float()


def recurrent_inputs(phi_q, phi_k, v, g, m):
    """GLA operands: phi_q, phi_k, v in v's dtype (padded tokens zeroed: no write), g fp32 (zeroed: no decay)."""
    if m is not None:
        phi_k, v, g = phi_k * m, v * m.to(v.dtype), g * m
    return phi_q.to(v.dtype), phi_k.to(v.dtype), v, g


def liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale: float, window: int, mix: float,
              gate_normalizer: float, gla_fwd=gla_naive.gla_fwd, swa_fwd=swa_naive.swa_fwd):
    B, T = q_rope.shape[0], q_rope.shape[2]
    phi_q, phi_k, g = features(q_pre, k_pre, gate_src, gate_normalizer)
    o_gla, hT = gla_fwd(*recurrent_inputs(phi_q, phi_k, v, g, padding_mask(pos)), h0)
    p = positions(pos, B, T, q_rope.device)
    o_swa, lse = swa_fwd(q_rope.to(v.dtype), k_rope.to(v.dtype), v, p, p, float(scale), int(window), 0)
    o = mix * o_gla + (1.0 - mix) * o_swa.float()
    return o.to(v.dtype), hT, lse


def _softmax_bwd(phi, dphi):
    return phi * (dphi - (phi * dphi).sum(-1, keepdim=True))


def liger_bwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, scale: float, window: int,
              mix: float, gate_normalizer: float, gla_bwd=gla_naive.gla_bwd_chunked, swa_fwd=swa_naive.swa_fwd,
              swa_bwd=swa_naive.swa_bwd):
    """Gradients of ``liger_fwd`` given ``do`` (o's gradient) and ``dhT`` (None = zero).

    The window branch's output is recomputed (``swa_fwd``); its saved ``lse`` is used as is."""
    B, T = q_rope.shape[0], q_rope.shape[2]
    phi_q, phi_k, g = features(q_pre, k_pre, gate_src, gate_normalizer)
    m = padding_mask(pos)
    dphi_q, dphi_k, dv_gla, dg, dh0 = gla_bwd(*recurrent_inputs(phi_q, phi_k, v, g, m), h0, mix * do.float(), dhT)
    p = positions(pos, B, T, q_rope.device)
    qr, kr = q_rope.to(v.dtype), k_rope.to(v.dtype)
    o_swa, _ = swa_fwd(qr, kr, v, p, p, float(scale), int(window), 0)
    do_swa = ((1.0 - mix) * do.float()).to(v.dtype)
    dq_rope, dk_rope, dv_swa = swa_bwd(qr, kr, v, p, p, o_swa, lse, do_swa, float(scale), int(window), 0)
    dphi_k, dv_gla, dg = dphi_k.float(), dv_gla.float(), dg.float()
    if m is not None:
        dphi_k, dv_gla, dg = dphi_k * m, dv_gla * m, dg * m
    dq_pre = _softmax_bwd(phi_q, dphi_q.float())
    dk_pre = _softmax_bwd(phi_k, dphi_k)
    # d logsigmoid(x) / dx = sigmoid(-x)
    dgate = dg * torch.sigmoid(-gate_src.float()) / gate_normalizer
    dv = dv_gla + dv_swa.float()
    return (dq_pre.to(q_pre.dtype), dk_pre.to(k_pre.dtype), dv.to(v.dtype), dgate.to(gate_src.dtype),
            dq_rope.to(q_rope.dtype), dk_rope.to(k_rope.dtype), dh0.float())
