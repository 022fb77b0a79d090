"""Sliding-window softmax attention with positions in Triton: forward (+lse) and backward, GQA without repeating k/v.

Same contract as ``naive.swa_fwd`` / ``naive.swa_bwd``::

    q: [B, HQ, TQ, K]   k: [B, HKV, TK, K]   v: [B, HKV, TK, V]   q_pos: [B, TQ]   k_pos: [B, TK]   (int64, -1 = none)
    swa_fwd(q, k, v, q_pos, k_pos, scale, window, sinks)                 -> o (q's dtype), lse fp32 (-inf: no key)
    swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, scale, window, sinks)    -> dq, dk, dv

Query i sees key j iff both positions are valid, ``k_pos[j] <= q_pos[i]`` and
(``q_pos[i] - k_pos[j] <= window`` or ``k_pos[j] < sinks``). Rows that see no key output 0.

Which blocks are visited. The kernels apply the full visibility rule to every score, so results never depend on the
block ranges below as long as those ranges cover every visible pair. They are computed on the device (no host sync)
under this assumption, which callers must keep: **along TK the valid k_pos are non-decreasing, and along TQ the valid
q_pos are non-decreasing**; ``-1`` entries may sit anywhere (left padding, empty cache slots at the end). Self
attention, left-padded batches and a linear (not wrapped) KV cache all satisfy it; a wrapped ring buffer does not
(unroll it first). Query block Q visits key indices ``[0, sink_hi)`` (keys with ``k_pos < sinks``) and
``[lo, hi)``: ``lo`` = first index whose running max of k_pos reaches ``min(q_pos in Q) - window``, ``hi`` = one past
the last index whose suffix min of valid k_pos is ``<= max(q_pos in Q)`` (``_monotone``). The dk/dv kernel uses the
mirror ranges over queries.

Kernels: ``swa_fwd_kernel`` (online softmax over the visited key blocks), ``swa_bwd_kernel_delta``
(rowsum(do * o)), ``swa_bwd_kernel_dq`` (per query block) and ``swa_bwd_kernel_dkdv`` (per key block, summing the
G query heads of the group: no atomics).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..utils import autotune, common_dtype, dot_precision, warps_stages

LOG2E = 1.4426950408889634
INT64_MAX = torch.iinfo(torch.int64).max


# head dim -> (BM, BN, num_warps) for the forward, dq and dk/dv kernels: the largest tiles that compile without
# register spills on sm_90 in bf16 (cuobjdump --dump-resource-usage, triton 3.9 offline). In dk/dv, BM is the inner
# query block and BN the key block the program owns.
BLOCKS = {
    64: {"fwd": (64, 64, 8), "dq": (64, 64, 8), "dkdv": (32, 64, 8)},
    128: {"fwd": (64, 32, 4), "dq": (64, 32, 4), "dkdv": (64, 32, 4)},
    256: {"fwd": (64, 32, 8), "dq": (32, 64, 8), "dkdv": (64, 32, 8)},
}


def _cfg(name: str, D: int, TQ: int):
    BM, BN, warps = BLOCKS[min(256, max(64, triton.next_power_of_2(D)))][name]
    return min(BM, max(16, triton.next_power_of_2(TQ))), BN, warps


def _default(name: str):
    return lambda kw: triton.Config({}, num_warps=_cfg(name, max(kw["K"], kw["V"]), 1 << 20)[2], num_stages=2)


@triton.jit
def _visible(b_qp, b_kp, window, sinks):
    """[BM, BN] visibility of keys (positions ``b_kp`` [BN]) to queries (positions ``b_qp`` [BM])."""
    b_d = b_qp[:, None] - b_kp[None, :]
    m_band = (b_d <= window) | (b_kp < sinks)[None, :]
    return (b_kp >= 0)[None, :] & (b_qp >= 0)[:, None] & (b_d >= 0) & m_band


@triton.jit
def _swa_fwd_inner(b_acc, b_l, b_m, b_q, b_qp, p_k, p_v, p_kpos, i_n0, i_n1, TK, window, sinks, qk_scale,
                   K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    for i_n in range(i_n0, i_n1):
        o_n = tl.cast(i_n, tl.int64) * BN + tl.arange(0, BN)
        m_n = o_n < TK
        b_kp = tl.load(p_kpos + o_n, mask=m_n, other=-1).to(tl.int32)
        b_k = tl.load(p_k + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & (o_k < K)[None, :], other=0.)
        # [BM, BN] scores in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_s = tl.where(_visible(b_qp, b_kp, window, sinks), b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # rows that have seen no key yet keep m = -inf; shift them by 0 so that exp2 gives 0, not NaN
        b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(p_v + o_n[:, None] * V + o_v[None, :], mask=m_n[:, None] & (o_v < V)[None, :], other=0.)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn
    return b_acc, b_l, b_m


@triton.jit
def _query_tile(TQ, HQ, G: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The query block of a program on the (query blocks, B·HQ) grid: block / (b, hq) / batch / KV-head indices, the
    number of query blocks, query offsets and mask, and the K / V column offsets."""
    i_m, i_bh = tl.cast(tl.program_id(0), tl.int64), tl.cast(tl.program_id(1), tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    return i_m, i_bh, i_bh // HQ, i_bh // G, tl.cdiv(TQ, BM), o_m, o_m < TQ, tl.arange(0, BK), tl.arange(0, BV)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BM", "BN", "G"],
          default=_default("fwd"))
@triton.jit(do_not_specialize=["TQ", "TK", "window", "sinks"])
def swa_fwd_kernel(q, k, v, q_pos, k_pos, rng, o, lse, qk_scale, window, sinks, TQ, TK, HQ, G: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, PREC: tl.constexpr):
    i_m, i_bh, i_b, i_bhk, NQB, o_m, m_m, o_k, o_v = _query_tile(TQ, HQ, G, BM, BK, BV)

    b_q = tl.load(q + i_bh * TQ * K + o_m[:, None] * K + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :],
                  other=0.)
    b_qp = tl.load(q_pos + i_b * TQ + o_m, mask=m_m, other=-1).to(tl.int32)
    p_rng = rng + (i_b * NQB + i_m) * 3
    i_lo, i_hi, i_sink = tl.load(p_rng), tl.load(p_rng + 1), tl.load(p_rng + 2)
    n_sink = tl.cdiv(tl.minimum(i_sink, i_hi), BN)

    p_k = k + i_bhk * TK * K
    p_v = v + i_bhk * TK * V
    p_kpos = k_pos + i_b * TK
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_acc, b_l, b_m = _swa_fwd_inner(b_acc, b_l, b_m, b_q, b_qp, p_k, p_v, p_kpos, 0, n_sink, TK, window, sinks,
                                     qk_scale, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=PREC)
    b_acc, b_l, b_m = _swa_fwd_inner(b_acc, b_l, b_m, b_q, b_qp, p_k, p_v, p_kpos, tl.maximum(i_lo // BN, n_sink),
                                     tl.cdiv(i_hi, BN), TK, window, sinks, qk_scale, K=K, V=V, BN=BN, BK=BK, BV=BV,
                                     PREC=PREC)
    m_l = b_l > 0
    b_o = tl.where(m_l[:, None], b_acc / tl.where(m_l, b_l, 1.)[:, None], 0.)
    b_lse = tl.where(m_l, (b_m + tl.log2(tl.where(m_l, b_l, 1.))) / 1.4426950408889634, float("-inf"))
    tl.store(o + i_bh * TQ * V + o_m[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_m[:, None] & (o_v < V)[None, :])
    tl.store(lse + i_bh * TQ + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["TQ"])
def swa_bwd_kernel_delta(o, do, delta, TQ, V: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_m, i_bh = tl.cast(i_m, tl.int64), tl.cast(i_bh, tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = tl.arange(0, BV)
    m_mv = (o_m < TQ)[:, None] & (o_v < V)[None, :]
    o_mv = i_bh * TQ * V + o_m[:, None] * V + o_v[None, :]
    b_o = tl.load(o + o_mv, mask=m_mv, other=0.).to(tl.float32)
    b_do = tl.load(do + o_mv, mask=m_mv, other=0.).to(tl.float32)
    tl.store(delta + i_bh * TQ + o_m, tl.sum(b_o * b_do, 1), mask=o_m < TQ)


@triton.jit
def _swa_dq_inner(b_dq, b_q, b_do, b_qp, b_lse, b_delta, p_k, p_v, p_kpos, i_n0, i_n1, TK, window, sinks,
                  qk_scale, K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    for i_n in range(i_n0, i_n1):
        o_n = tl.cast(i_n, tl.int64) * BN + tl.arange(0, BN)
        m_n = o_n < TK
        b_kp = tl.load(p_kpos + o_n, mask=m_n, other=-1).to(tl.int32)
        b_k = tl.load(p_k + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & (o_k < K)[None, :], other=0.)
        b_v = tl.load(p_v + o_n[:, None] * V + o_v[None, :], mask=m_n[:, None] & (o_v < V)[None, :], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_p = tl.where(_visible(b_qp, b_kp, window, sinks), tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    return b_dq


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BM", "BN", "G"],
          default=_default("dq"))
@triton.jit(do_not_specialize=["TQ", "TK", "window", "sinks"])
def swa_bwd_kernel_dq(q, k, v, q_pos, k_pos, rng, lse, delta, do, dq, scale, qk_scale, window, sinks, TQ, TK, HQ,
                      G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_m, i_bh, i_b, i_bhk, NQB, o_m, m_m, o_k, o_v = _query_tile(TQ, HQ, G, BM, BK, BV)
    m_mk = m_m[:, None] & (o_k < K)[None, :]

    b_q = tl.load(q + i_bh * TQ * K + o_m[:, None] * K + o_k[None, :], mask=m_mk, other=0.)
    b_do = tl.load(do + i_bh * TQ * V + o_m[:, None] * V + o_v[None, :], mask=m_m[:, None] & (o_v < V)[None, :],
                   other=0.)
    b_qp = tl.load(q_pos + i_b * TQ + o_m, mask=m_m, other=-1).to(tl.int32)
    b_lse = tl.load(lse + i_bh * TQ + o_m, mask=m_m, other=0.) * 1.4426950408889634
    b_delta = tl.load(delta + i_bh * TQ + o_m, mask=m_m, other=0.)
    p_rng = rng + (i_b * NQB + i_m) * 3
    i_lo, i_hi, i_sink = tl.load(p_rng), tl.load(p_rng + 1), tl.load(p_rng + 2)
    n_sink = tl.cdiv(tl.minimum(i_sink, i_hi), BN)

    p_k = k + i_bhk * TK * K
    p_v = v + i_bhk * TK * V
    p_kpos = k_pos + i_b * TK
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)
    b_dq = _swa_dq_inner(b_dq, b_q, b_do, b_qp, b_lse, b_delta, p_k, p_v, p_kpos, 0, n_sink, TK, window, sinks,
                         qk_scale, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=PREC)
    b_dq = _swa_dq_inner(b_dq, b_q, b_do, b_qp, b_lse, b_delta, p_k, p_v, p_kpos, tl.maximum(i_lo // BN, n_sink),
                         tl.cdiv(i_hi, BN), TK, window, sinks, qk_scale, K=K, V=V, BN=BN, BK=BK, BV=BV, PREC=PREC)
    tl.store(dq + i_bh * TQ * K + o_m[:, None] * K + o_k[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_mk)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BM", "BN", "G"],
          default=_default("dkdv"))
@triton.jit(do_not_specialize=["TQ", "TK", "window", "sinks"])
def swa_bwd_kernel_dkdv(q, k, v, q_pos, k_pos, rng, lse, delta, do, dk, dv, scale, qk_scale, window, sinks, TQ, TK,
                        HKV, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_n, i_bh = tl.cast(i_n, tl.int64), tl.cast(i_bh, tl.int64)
    i_b = i_bh // HKV
    NKB = tl.cdiv(TK, BN)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < TK
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_nk = m_n[:, None] & (o_k < K)[None, :]
    m_nv = m_n[:, None] & (o_v < V)[None, :]

    b_k = tl.load(k + i_bh * TK * K + o_n[:, None] * K + o_k[None, :], mask=m_nk, other=0.)
    b_v = tl.load(v + i_bh * TK * V + o_n[:, None] * V + o_v[None, :], mask=m_nv, other=0.)
    b_kp = tl.load(k_pos + i_b * TK + o_n, mask=m_n, other=-1).to(tl.int32)
    p_rng = rng + (i_b * NKB + i_n) * 2
    i_m0, i_m1 = tl.load(p_rng) // BM, tl.cdiv(tl.load(p_rng + 1), BM)

    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)
    for i_g in range(G):
        i_hq = i_bh * G + i_g
        for i_m in range(i_m0, i_m1):
            o_m = tl.cast(i_m, tl.int64) * BM + tl.arange(0, BM)
            m_m = o_m < TQ
            b_q = tl.load(q + i_hq * TQ * K + o_m[:, None] * K + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :],
                          other=0.)
            b_do = tl.load(do + i_hq * TQ * V + o_m[:, None] * V + o_v[None, :],
                           mask=m_m[:, None] & (o_v < V)[None, :], other=0.)
            b_qp = tl.load(q_pos + i_b * TQ + o_m, mask=m_m, other=-1).to(tl.int32)
            b_lse = tl.load(lse + i_hq * TQ + o_m, mask=m_m, other=0.) * 1.4426950408889634
            b_delta = tl.load(delta + i_hq * TQ + o_m, mask=m_m, other=0.)
            # transposed scores [BN, BM]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
            m_vis = tl.trans(_visible(b_qp, b_kp, window, sinks))
            b_pt = tl.where(m_vis, tl.exp2(b_st - b_lse[None, :]), 0.)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(dk + i_bh * TK * K + o_n[:, None] * K + o_k[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_nk)
    tl.store(dv + i_bh * TK * V + o_n[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_nv)


# ------------------------------------------------------------------------------------------------ host wrappers
def _monotone(pos):
    """Two non-decreasing envelopes of positions whose valid entries are non-decreasing: ``cummax`` (-1 before the
    first valid entry) for lower bounds, reverse ``cummin`` with invalid = +inf (after the last one) for upper
    bounds."""
    m_lo = pos.cummax(-1).values.contiguous()
    m_hi = torch.where(pos >= 0, pos, INT64_MAX).flip(-1).cummin(-1).values.flip(-1).contiguous()
    return m_lo, m_hi


def _key_ranges(q_pos, k_pos, window: int, sinks: int, BM: int):
    """Per query block: ``[lo, hi)`` key indices of the window band and ``sink_hi`` (keys with k_pos < sinks)."""
    B, TQ = q_pos.shape
    NQB = triton.cdiv(TQ, BM)
    m_lo, m_hi = _monotone(k_pos)
    qp = F.pad(q_pos, (0, NQB * BM - TQ), value=-1).view(B, NQB, BM)
    q_max = qp.amax(-1)
    q_min = torch.where(qp >= 0, qp, INT64_MAX).amin(-1)
    # valid positions are >= 0: clamping skips the leading padding slots (m_lo = -1 there)
    lo = torch.searchsorted(m_lo, (q_min - window).clamp_min(0).contiguous(), side="left")
    hi = torch.searchsorted(m_hi, q_max.contiguous(), side="right")
    if sinks > 0:
        sink = torch.searchsorted(m_hi, torch.full_like(q_max, sinks - 1), side="right")
    else:
        sink = torch.zeros_like(hi)
    valid = q_max >= 0
    rng = torch.stack([lo, hi, sink], -1).masked_fill(~valid[..., None], 0)
    return rng.to(torch.int32).contiguous()


def _query_ranges(q_pos, k_pos, window: int, sinks: int, BN: int):
    """Per key block: ``[lo, hi)`` query indices that may see one of its keys."""
    B, TK = k_pos.shape
    TQ = q_pos.shape[1]
    NKB = triton.cdiv(TK, BN)
    m_lo, m_hi = _monotone(q_pos)
    kp = F.pad(k_pos, (0, NKB * BN - TK), value=-1).view(B, NKB, BN)
    k_max = kp.amax(-1)
    k_min = torch.where(kp >= 0, kp, INT64_MAX).amin(-1)
    lo = torch.searchsorted(m_lo, k_min.contiguous(), side="left")
    hi = torch.searchsorted(m_hi, (k_max + window).contiguous(), side="right")
    if sinks > 0:
        hi = torch.where(k_min < sinks, TQ, hi)
    rng = torch.stack([lo, hi], -1).masked_fill(~(k_max >= 0)[..., None], 0)
    return rng.to(torch.int32).contiguous()


def _prep(q, k, v, q_pos, k_pos):
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    dt = common_dtype(q, k, v)
    return [x.to(dt).contiguous() for x in (q, k, v)] + [q_pos.to(torch.int64).contiguous(),
                                                       k_pos.to(torch.int64).contiguous()]


def swa_fwd(q, k, v, q_pos, k_pos, scale: float, window: int, sinks: int = 0):
    """Forward: ``(o [B,HQ,TQ,V] in q's dtype, lse [B,HQ,TQ] fp32)``."""
    out_dtype = q.dtype
    q, k, v, q_pos, k_pos = _prep(q, k, v, q_pos, k_pos)
    B, HQ, TQ, K = q.shape
    HKV, TK, V = k.shape[1], k.shape[2], v.shape[-1]
    BM, BN, _ = _cfg("fwd", max(K, V), TQ)
    rng = _key_ranges(q_pos, k_pos, window, sinks, BM)
    o = q.new_empty(B, HQ, TQ, V, dtype=out_dtype)
    lse = q.new_empty(B, HQ, TQ, dtype=torch.float32)
    grid = (triton.cdiv(TQ, BM), B * HQ)
    swa_fwd_kernel[grid](q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, rng=rng, o=o, lse=lse, qk_scale=scale * LOG2E,
                         window=window, sinks=sinks, TQ=TQ, TK=TK, HQ=HQ, G=HQ // HKV, K=K, V=V, BM=BM, BN=BN,
                         BK=max(16, triton.next_power_of_2(K)), BV=max(16, triton.next_power_of_2(V)),
                         PREC=dot_precision(q.dtype))
    return o, lse


def swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, scale: float, window: int, sinks: int = 0, dlse=None):
    """Backward: ``(dq, dk, dv)`` in the input dtypes; ``dlse`` (gradient of ``lse``, optional) enters through
    ``delta`` (``ds = p (dp - (delta - dlse))``, as in the reference)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, q_pos, k_pos = _prep(q, k, v, q_pos, k_pos)
    B, HQ, TQ, K = q.shape
    HKV, TK, V = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    BK, BV = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    prec = dot_precision(q.dtype)
    o, do, lse = o.contiguous(), do.to(q.dtype).contiguous(), lse.contiguous()

    delta = q.new_empty(B, HQ, TQ, dtype=torch.float32)
    swa_bwd_kernel_delta[(triton.cdiv(TQ, 32), B * HQ)](o=o, do=do, delta=delta, TQ=TQ, V=V, BM=32, BV=BV)
    if dlse is not None:
        delta = (delta - dlse.float()).contiguous()

    dq = torch.empty(B, HQ, TQ, K, dtype=dtypes[0], device=q.device)
    BM, BN, _ = _cfg("dq", max(K, V), TQ)
    rng = _key_ranges(q_pos, k_pos, window, sinks, BM)
    swa_bwd_kernel_dq[(triton.cdiv(TQ, BM), B * HQ)](
        q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, rng=rng, lse=lse, delta=delta, do=do, dq=dq, scale=scale,
        qk_scale=scale * LOG2E, window=window, sinks=sinks, TQ=TQ, TK=TK, HQ=HQ, G=G, K=K, V=V, BM=BM, BN=BN, BK=BK,
        BV=BV, PREC=prec)

    dk = torch.empty(B, HKV, TK, K, dtype=dtypes[1], device=q.device)
    dv = torch.empty(B, HKV, TK, V, dtype=dtypes[2], device=q.device)
    BM, BN, _ = _cfg("dkdv", max(K, V), TQ)
    rng = _query_ranges(q_pos, k_pos, window, sinks, BN)
    swa_bwd_kernel_dkdv[(triton.cdiv(TK, BN), B * HKV)](
        q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, rng=rng, lse=lse, delta=delta, do=do, dk=dk, dv=dv, scale=scale,
        qk_scale=scale * LOG2E, window=window, sinks=sinks, TQ=TQ, TK=TK, HKV=HKV, G=G, K=K, V=V, BM=BM, BN=BN, BK=BK,
        BV=BV, PREC=prec)
    return dq, dk, dv
