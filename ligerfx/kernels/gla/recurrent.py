"""Fused recurrent GLA forward in Triton: one launch, for decode steps and very short prefills.

Same contract as ``naive.gla_fwd_recurrent``: ``(o [B,HQ,T,V] fp32, hT [B,HKV,K,V] fp32)``. One program per
(V block, batch, KV head) keeps a [K, BV] fp32 slice of the state in registers, walks the T tokens and serves all
``G`` query heads of its group from that one state (GQA without repeating the state). No per-chunk state is written,
so this beats the chunk kernels for T up to a few tokens; training and longer prefills use ``chunk.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils import autotune, common_dtype, warps_stages

MAX_T = 16  # gla_fwd uses this kernel up to this many tokens


@autotune(configs=warps_stages(warps=(1, 2, 4), stages=(1,)), key=["K", "V", "BK", "BV", "G"],
          default=lambda kw: triton.Config({}, num_warps=4, num_stages=1))
@triton.jit(do_not_specialize=["T"])
def gla_fwd_kernel_recurrent(q, k, v, g, h0, o, ht, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = tl.cast(i_bh, tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    for i_s in range(T):
        i_t = tl.cast(i_s, tl.int64)
        b_k = tl.load(k + (i_bh * T + i_t) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(g + (i_bh * T + i_t) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + (i_bh * T + i_t) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        for i_g in range(G):
            i_hq = i_bh * G + i_g
            b_q = tl.load(q + (i_hq * T + i_t) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            tl.store(o + (i_hq * T + i_t) * V + o_v, tl.sum(b_q[:, None] * b_h, 0), mask=m_v)
    tl.store(ht + i_bh * K * V + o_kv, b_h, mask=m_kv)


def recurrent_gla_fwd(q, k, v, g, h0: Optional[torch.Tensor] = None):
    """Token-by-token forward: ``(o [B,HQ,T,V] fp32, hT [B,HKV,K,V] fp32)``."""
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({HKV})")
    dt = common_dtype(q, k, v)
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    g = g.contiguous()
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 32 if BK > 128 else 64)
    o = q.new_empty(B, HQ, T, V, dtype=torch.float32)
    ht = q.new_empty(B, HKV, K, V, dtype=torch.float32)
    grid = (triton.cdiv(V, BV), B * HKV)
    gla_fwd_kernel_recurrent[grid](q=q, k=k, v=v, g=g, h0=h0.contiguous() if h0 is not None else ht, o=o, ht=ht,
                                   T=T, G=HQ // HKV, K=K, V=V, BK=BK, BV=BV, USE_H0=h0 is not None)
    return o, ht
