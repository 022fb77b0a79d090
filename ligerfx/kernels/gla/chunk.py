"""Chunked gated linear attention (GLA) in Triton: forward and backward, GQA-aware, fp32 state.

Same contract as ``naive.gla_fwd`` / ``naive.gla_bwd_chunked`` (head-first; k, v, g and the state per KV head, q and
o per query head; ``g`` is the log forget gate, ``<= 0``; scale 1)::

    chunk_gla_fwd(q, k, v, g, h0)              -> o [B, HQ, T, V] fp32, hT [B, HKV, K, V] fp32
    chunk_gla_bwd(q, k, v, g, h0, do, dhT)     -> dq, dk, dv, dg (input dtypes), dh0 fp32

Algorithm. Time is cut into chunks of ``BT`` (64) tokens. With ``c`` the in-chunk cumulative gate, ``L_n`` chunk n's
own contribution to the state and ``h_n`` the state at its start::

    L_n     = (k * exp(c_last - c))^T v                          (all chunks in parallel)
    h_{n+1} = diag(exp(c_last)) h_n + L_n                        (element-wise scan over chunks, no matmul)
    o_i     = (q_i * exp(c_i)) h_n + sum_{j <= i in chunk} A_ij v_j,   A_ij = sum_d q_id k_jd exp(c_id - c_jd)

The backward pass mirrors it: ``dL_n = sum_heads (q * exp(c))^T do`` in parallel, then the reverse scan gives the
gradient of every chunk's end state and ``dh0``. Only the two scans are sequential, and they are element-wise, so
they stream at memory speed whatever B * H is.

Intra-chunk scores. Every exponent is "later minus earlier", so ``<= 0``. A chunk whose total log decay stays above
``-FAST_DECAY`` (every Liger gate in practice) factorises ``A`` through the chunk start: one tensor-core dot of
``q exp(c)`` (<= q) with ``k exp(-c)`` (<= k exp(FAST_DECAY)). Any other chunk takes the sub-chunk path: a pair of
16-row sub-chunks (a > b) factorises through the first row of a (both factors <= 1) and diagonal sub-chunks are
summed element-wise. The two paths are two compilations of the same kernel (``STRONG``); both are launched, and each
program first checks its chunk and leaves at once if the chunk belongs to the other path, so no host sync decides.

Gate gradient: ``d/db_t = sum_heads q_t dq_t - k_t dk_t`` for the global cumulative gate b, plus ``rowsum(hT * dhT)``
at the last step, then ``dg = reverse_cumsum(db)`` (in-chunk in the dq/dk kernel, across chunks by adding suffix sums
of the chunk totals). The difference amplifies the relative error of dq and dk about tenfold, so states are fp32 and
the backward dots take fp32 operands (tf32 for 16-bit inputs; ``LIGERFX_GLA_BWD_PREC=tf32x3`` for more).

Kernels (one host wrapper each, keyword launches)::

    gla_fwd_kernel_local   L_n and the in-chunk cumulative gate                     parallel
    gla_kernel_scan        h_n from L_n (forward) or dh_n from dL_n (reverse)      sequential, element-wise
    gla_fwd_kernel_o       output                                                   parallel
    gla_bwd_kernel_dlocal  dL_n                                                     parallel
    gla_bwd_kernel_dqk     dq, dk, in-chunk reverse cumsum of db, chunk totals      parallel
    gla_bwd_kernel_dv      dv                                                       parallel
    gla_bwd_kernel_dg      dg = in-chunk part + suffix of later chunks             parallel
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils import autotune, common_dtype, dot_precision, interpreting, warps_stages

BC = 16  # sub-chunk size of the strong-gate path
# a chunk whose total log decay (every key dim) stays above -FAST_DECAY takes the one-dot intra-chunk path
FAST_DECAY = tl.constexpr(30.0)
SCAN_BLOCK, SCAN_CHUNKS = 256, 16  # state elements per program of the scans, chunks per step

# name -> (BK cap, BV cap, num_warps, num_stages): the largest tiles that compile without register spills on sm_90 in
# bf16 (cuobjdump --dump-resource-usage, triton 3.9 offline); the launch config unless LIGERFX_AUTOTUNE=1.
# dqk stays at num_stages=1: with 2 stages, triton 3.6 on an H200 computes a wrong dq (rel. error 0.7) for bf16 inputs
# with G = 4 (tests/gpu, 2026-11-26); dlocal passes at (128, 64, 8, 2) too but was not timed.
BLOCKS = {
    "local": (64, 64, 4, 2), "dlocal": (64, 64, 8, 2), "scan": (0, 0, 4, 1), "dg": (64, 0, 4, 2),
    "o": (32, 128, 8, 2), "o_strong": (32, 128, 8, 1),
    "dqk": (32, 32, 8, 1), "dqk_strong": (16, 32, 8, 1),
    "dv": (32, 128, 8, 1), "dv_strong": (32, 64, 8, 1),
}
# debugging / tuning override, e.g. LIGERFX_GLA_BLOCKS="dqk=32,32,8,2;o=32,128,8,1"
for _item in filter(None, os.environ.get("LIGERFX_GLA_BLOCKS", "").split(";")):
    _name, _vals = _item.split("=")
    BLOCKS[_name.strip()] = tuple(int(x) for x in _vals.split(","))


def chunk_size(T: int) -> int:
    return min(64, max(BC, triton.next_power_of_2(T)))


def _blocks(name: str, K: int, V: int):
    bk, bv = BLOCKS[name][:2]
    return min(bk, max(16, triton.next_power_of_2(K))), min(bv, max(16, triton.next_power_of_2(V)))


def _default(name: str):
    def pick(kw):
        key = name + ("_strong" if kw.get("STRONG", False) else "")
        return triton.Config({}, num_warps=BLOCKS[key][2], num_stages=BLOCKS[key][3])
    return pick


# ------------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _chunk_is_fast(p_gc, i_t, T, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """True if the chunk's total log decay stays above -FAST_DECAY in every key dim (same answer in every kernel)."""
    t_l = tl.minimum(i_t * BT + BT - 1, T - 1)
    b_m = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_m = tl.minimum(b_m, tl.load(p_gc + t_l * K + o_k, mask=o_k < K, other=0.))
    return tl.min(b_m, 0) > -FAST_DECAY


@triton.jit
def _gla_intra_A_strong(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k,
                        K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """Adds one K block's share of A[i, j] = sum_d q_id k_jd exp(c_id - c_jd), j <= i, every exponent <= 0."""
    o_i = tl.arange(0, BT)
    for i_c in range(1, BT // BC):
        # reference row: first row of query sub-chunk i_c
        t_r = tl.minimum(i_t * BT + i_c * BC, T - 1)
        b_gr = tl.load(p_gc + t_r * K + o_k, mask=m_k, other=0.)
        b_qr = b_q * tl.exp(tl.minimum(b_gc - b_gr[None, :], 0.))
        b_kr = b_k * tl.exp(tl.minimum(b_gr[None, :] - b_gc, 0.))
        m_r = ((o_i // BC) == i_c)[:, None] & (o_i < i_c * BC)[None, :]
        b_A += tl.where(m_r, tl.dot(b_qr, tl.trans(b_kr), input_precision=PREC), 0.)
    for i_c in range(BC):
        # key row j = (first row of i's sub-chunk) + i_c, for every query row i at once
        o_j = (o_i // BC) * BC + i_c
        t_j = i_t * BT + o_j
        b_kj = tl.load(p_k + t_j[:, None] * K + o_k[None, :], mask=(t_j < T)[:, None] & m_k[None, :], other=0.)
        b_gj = tl.load(p_gc + tl.minimum(t_j, T - 1)[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        b_a = tl.sum(b_q * b_kj * tl.exp(tl.minimum(b_gc - b_gj, 0.)), 1)
        m_j = (o_i[None, :] == o_j[:, None]) & ((o_i % BC) >= i_c)[:, None]
        b_A += tl.where(m_j, b_a[:, None], 0.)
    return b_A


@triton.jit
def _gla_intra_A(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k, K: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, PREC: tl.constexpr, STRONG: tl.constexpr):
    if STRONG:
        b_A = _gla_intra_A_strong(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k, K=K, BT=BT, BC=BC, PREC=PREC)
    else:
        # exp(c_i) <= 1 and exp(-c_j) <= exp(FAST_DECAY)
        o_i = tl.arange(0, BT)
        b_qg = b_q * tl.exp(b_gc)
        b_kg = b_k * tl.exp(-b_gc)
        b_A += tl.where(o_i[:, None] >= o_i[None, :], tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC), 0.)
    return b_A


@triton.jit
def _gla_bwd_intra_strong(b_dq, b_dk, b_dA, b_q, b_k, b_gc, p_q, p_k, p_gc, i_t, T, o_k, m_k, K: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """Gated intra-chunk parts of dq (one query head) and dk for any gate strength (every exponent <= 0)."""
    o_i = tl.arange(0, BT)
    for i_c in range(1, BT // BC):
        # dq rows of sub-chunk i_c: reference = its first row
        t_r = tl.minimum(i_t * BT + i_c * BC, T - 1)
        b_gr = tl.load(p_gc + t_r * K + o_k, mask=m_k, other=0.)
        b_kr = b_k * tl.exp(tl.minimum(b_gr[None, :] - b_gc, 0.))
        b_dAr = tl.where(((o_i // BC) == i_c)[:, None] & (o_i < i_c * BC)[None, :], b_dA, 0.)
        b_dq += tl.dot(b_dAr, b_kr, input_precision=PREC) * tl.exp(tl.minimum(b_gc - b_gr[None, :], 0.))
        # dk rows of sub-chunk i_c - 1: reference = its last row
        t_m = tl.minimum(i_t * BT + i_c * BC - 1, T - 1)
        b_gm = tl.load(p_gc + t_m * K + o_k, mask=m_k, other=0.)
        b_qm = b_q * tl.exp(tl.minimum(b_gc - b_gm[None, :], 0.))
        b_dAm = tl.where((o_i >= i_c * BC)[:, None] & ((o_i // BC) == i_c - 1)[None, :], b_dA, 0.)
        b_dk += tl.dot(tl.trans(b_dAm), b_qm, input_precision=PREC) * tl.exp(tl.minimum(b_gm[None, :] - b_gc, 0.))
    for i_c in range(BC):
        o_j = (o_i // BC) * BC + i_c
        t_j = i_t * BT + o_j
        m_j = (t_j < T)[:, None] & m_k[None, :]
        b_gj = tl.load(p_gc + tl.minimum(t_j, T - 1)[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        # dq_i += dA[i, j] k_j exp(c_i - c_j) with j = block(i) + i_c <= i
        b_kj = tl.load(p_k + t_j[:, None] * K + o_k[None, :], mask=m_j, other=0.).to(tl.float32)
        b_dAj = tl.sum(tl.where(o_i[None, :] == o_j[:, None], b_dA, 0.), 1)
        b_dq += tl.where(((o_i % BC) >= i_c)[:, None], b_dAj[:, None] * b_kj * tl.exp(tl.minimum(b_gc - b_gj, 0.)), 0.)
        # dk_j += dA[i, j] q_i exp(c_i - c_j) with i = block(j) + i_c >= j
        b_qj = tl.load(p_q + t_j[:, None] * K + o_k[None, :], mask=m_j, other=0.).to(tl.float32)
        b_dAi = tl.sum(tl.where(o_i[:, None] == o_j[None, :], b_dA, 0.), 0)
        b_dk += tl.where(((o_i % BC) <= i_c)[:, None], b_dAi[:, None] * b_qj * tl.exp(tl.minimum(b_gj - b_gc, 0.)), 0.)
    return b_dq, b_dk


# ------------------------------------------------------------------------------------------------------ forward
@triton.jit
def _chunk_tile(T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The tile of a program on the (chunks x B·H, K blocks, V blocks) grid: chunk count, (b·h, chunk) index, V block,
    token / key / value offsets and their bounds masks."""
    i_tb, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.cdiv(T, BT)
    i_bh, i_t = tl.cast(i_tb // NT, tl.int64), tl.cast(i_tb % NT, tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return NT, i_bh, i_t, i_v, o_t, o_k, o_v, o_t < T, o_k < K, o_v < V


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BK", "BV", "BT"],
          default=_default("local"))
@triton.jit(do_not_specialize=["T"])
def gla_fwd_kernel_local(k, v, g, gc, hl, T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """L_n = (k exp(c_last - c))^T v for one chunk (fp32), and the in-chunk cumulative gate c (stored by i_v == 0)."""
    NT, i_bh, i_t, i_v, o_t, o_k, o_v, m_t, m_k, m_v = _chunk_tile(T, K, V, BT, BK, BV)
    m_tk = m_t[:, None] & m_k[None, :]

    # padded rows have g = 0: their cumulative gate repeats the last valid row's
    b_g = tl.load(g + i_bh * T * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_gc = tl.cumsum(b_g, 0)
    if i_v == 0:
        tl.store(gc + i_bh * T * K + o_t[:, None] * K + o_k[None, :], b_gc, mask=m_tk)
    b_gl = tl.sum(b_g, 0)
    b_k = tl.load(k + i_bh * T * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_v = tl.load(v + i_bh * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_kd = b_k * tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.))
    b_l = tl.dot(tl.trans(b_kd), b_v.to(tl.float32), input_precision=PREC)
    tl.store(hl + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :], b_l, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # s -> s * a1 + b1, then s -> s * a2 + b2
    return a1 * a2, b1 * a2 + b2


@autotune(configs=warps_stages(warps=(2, 4, 8), stages=(1, 2, 3)), key=["K", "V", "BT", "BS", "BU", "REVERSE"],
          default=_default("scan"), restore=["hl"])
@triton.jit(do_not_specialize=["T"])
def gla_kernel_scan(hl, gc, s0, h, st, T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                    BU: tl.constexpr, USE_S0: tl.constexpr, REVERSE: tl.constexpr):
    """s <- diag(exp(c_last,n)) s + hl[n] over the chunks n (backwards if REVERSE), storing each chunk's incoming s
    in h[n] (``h`` may alias ``hl``: every element is read before it is overwritten). Final s goes to ``st``.

    BU chunks per step: their affine maps are composed by an associative scan, so each step loads [BU, BS] at once
    (a one-chunk-per-step loop waits on memory latency at every chunk)."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    o_s = i_s * BS + tl.arange(0, BS)
    m_s = o_s < K * V
    # key dim of every state element: its decay
    o_sk = o_s // V
    o_u = tl.arange(0, BU)
    p_gc = gc + i_bh * T * K

    b_s = tl.zeros([BS], dtype=tl.float32)
    if USE_S0:
        b_s += tl.load(s0 + i_bh * K * V + o_s, mask=m_s, other=0.).to(tl.float32)
    for i_n in range(tl.cdiv(NT, BU)):
        # chunk of row u: the u-th one processed in this step
        if REVERSE:
            o_n = NT - 1 - (i_n * BU + o_u)
        else:
            o_n = i_n * BU + o_u
        m_n = (o_n >= 0) & (o_n < NT)
        o_n = tl.cast(tl.where(m_n, o_n, 0), tl.int64)
        m_ns = m_n[:, None] & m_s[None, :]
        p_n = (i_bh * NT + o_n)[:, None] * K * V + o_s[None, :]
        # [BU, BS]; rows past the last chunk are the identity map (decay 1, no input)
        b_l = tl.load(hl + p_n, mask=m_ns, other=0.)
        t_l = tl.minimum(o_n * BT + BT - 1, T - 1)
        b_d = tl.exp(tl.load(p_gc + t_l[:, None] * K + o_sk[None, :], mask=m_ns, other=0.))
        b_a, b_b = tl.associative_scan((b_d, b_l), 0, _affine_combine)
        # state after each row's chunk = incoming state of the next chunk processed; the last row's is carried
        b_r = b_s[None, :] * b_a + b_b
        if REVERSE:
            o_m = o_n - 1
        else:
            o_m = o_n + 1
        m_ms = (m_n & (o_u < BU - 1) & (o_m >= 0) & (o_m < NT))[:, None] & m_s[None, :]
        p_m = (i_bh * NT + o_m)[:, None] * K * V + o_s[None, :]
        tl.store(h + p_m, b_r.to(h.dtype.element_ty), mask=m_ms)
        tl.store(h + p_n, tl.broadcast_to(b_s[None, :], [BU, BS]).to(h.dtype.element_ty),
                 mask=(o_u == 0)[:, None] & m_ns)
        b_s = tl.sum(tl.where(o_u[:, None] == BU - 1, b_r, 0.), 0)
    tl.store(st + i_bh * K * V + o_s, b_s, mask=m_s)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT", "G", "STRONG"],
          default=_default("o"))
@triton.jit(do_not_specialize=["T"])
def gla_fwd_kernel_o(q, k, v, gc, h, o, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, STRONG: tl.constexpr):
    i_v, i_bh, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    i_bhk = i_bh // G
    p_gc = gc + i_bhk * T * K
    if _chunk_is_fast(p_gc, i_t, T, K=K, BT=BT, BK=BK) == STRONG:
        return
    NT = tl.cdiv(T, BT)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q = q + i_bh * T * K
    p_k = k + i_bhk * T * K
    p_h = h + (i_bhk * NT + i_t) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        # in the dtype of the stored states (the input dtype: bf16 tensor cores for 16-bit inputs)
        b_o += tl.dot((b_q * tl.exp(b_gc)).to(b_h.dtype), b_h, input_precision=PREC)
        b_A = _gla_intra_A(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k, K=K, BT=BT, BC=BC, PREC=PREC,
                           STRONG=STRONG)
    b_v = tl.load(v + i_bhk * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + i_bh * T * V + o_t[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------- backward
@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BK", "BV", "BT", "G"],
          default=_default("dlocal"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dlocal(q, gc, do, dl, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dL_n = sum_heads (q exp(c))^T do for one chunk: what the chunk's outputs send back to its start state."""
    NT, i_bh, i_t, i_v, o_t, o_k, o_v, m_t, m_k, m_v = _chunk_tile(T, K, V, BT, BK, BV)
    b_gc = tl.load(gc + i_bh * T * K + tl.minimum(o_t, T - 1)[:, None] * K + o_k[None, :], mask=m_k[None, :],
                   other=0.)
    b_g = tl.exp(b_gc)
    b_dl = tl.zeros([BK, BV], dtype=tl.float32)
    for i_g in range(G):
        i_hq = i_bh * G + i_g
        b_q = tl.load(q + i_hq * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_do = tl.load(do + i_hq * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.)
        b_dl += tl.dot(tl.trans(b_q * b_g), b_do.to(tl.float32), input_precision=PREC)
    tl.store(dl + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :], b_dl, mask=m_k[:, None] & m_v[None, :])


# tuned over warps only: 2 stages miscompile on triton 3.6 / H200 (see BLOCKS), and a tuner would pick them
@autotune(configs=warps_stages(warps=(4, 8), stages=(1,)), key=["K", "V", "BK", "BV", "BT", "G", "STRONG"],
          default=_default("dqk"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dqk(q, k, v, gc, h, do, dh, dq, dk, dgl, dbt, T, G: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr, STRONG: tl.constexpr):
    """dq (per query head) and dk for one chunk and K block; db = sum_heads q*dq - k*dk as its in-chunk reverse
    cumsum (``dgl``) and its chunk total (``dbt``)."""
    i_k, i_bh, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    p_gc = gc + i_bh * T * K
    if _chunk_is_fast(p_gc, i_t, T, K=K, BT=BT, BK=BK) == STRONG:
        return
    NT = tl.cdiv(T, BT)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_k = k + i_bh * T * K
    p_v = v + i_bh * T * V
    p_h = h + (i_bh * NT + i_t) * K * V
    p_dh = dh + (i_bh * NT + i_t) * K * V

    b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
    b_gl = tl.load(p_gc + tl.minimum(i_t * BT + BT - 1, T - 1) * K + o_k, mask=m_k, other=0.)
    b_causal = o_i[:, None] >= o_i[None, :]
    # fast path: dk = exp(-c) * (v dh^T exp(c_last) + sum_heads dA^T (q exp(c)))
    b_kg = b_k * tl.exp(tl.minimum(-b_gc, FAST_DECAY))

    # inter-chunk dk: v dh^T (dh = gradient of the chunk's end state)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(p_v + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dk += tl.dot(b_v.to(tl.float32), tl.trans(b_dh), input_precision=PREC)
    if STRONG:
        b_dk *= tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.))
    else:
        b_dk *= tl.exp(b_gl)[None, :]

    b_db = tl.zeros([BT, BK], dtype=tl.float32)
    for i_g in range(G):
        i_hq = i_bh * G + i_g
        p_q = q + i_hq * T * K
        p_do = do + i_hq * T * V
        b_q = tl.load(p_q + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dA = tl.zeros([BT, BT], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            b_do = tl.load(p_do + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
            b_v = tl.load(p_v + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
            b_do = b_do.to(tl.float32)
            b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
            b_dA += tl.dot(b_do, tl.trans(b_v.to(tl.float32)), input_precision=PREC)
        b_dA = tl.where(b_causal, b_dA, 0.)
        if STRONG:
            b_dq *= tl.exp(b_gc)
            b_dq, b_dk = _gla_bwd_intra_strong(b_dq, b_dk, b_dA, b_q, b_k, b_gc, p_q, p_k, p_gc, i_t, T, o_k, m_k,
                                               K=K, BT=BT, BC=BC, PREC=PREC)
        else:
            b_dq = (b_dq + tl.dot(b_dA, b_kg, input_precision=PREC)) * tl.exp(b_gc)
            b_dk += tl.dot(tl.trans(b_dA), b_q * tl.exp(b_gc), input_precision=PREC)
        tl.store(dq + i_hq * T * K + o_t[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_db += b_q * b_dq
    if not STRONG:
        b_dk *= tl.exp(tl.minimum(-b_gc, FAST_DECAY))
    b_db -= b_k * b_dk
    tl.store(dk + i_bh * T * K + o_t[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dgl + i_bh * T * K + o_t[:, None] * K + o_k[None, :], tl.cumsum(b_db, 0, reverse=True), mask=m_tk)
    tl.store(dbt + (i_bh * NT + i_t) * K + o_k, tl.sum(b_db, 0), mask=m_k)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT", "G", "STRONG"],
          default=_default("dv"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dv(q, k, gc, do, dh, dv, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                      STRONG: tl.constexpr):
    """dv = sum_heads A^T do (intra-chunk) + (k exp(c_last - c)) dh (inter-chunk), per KV head."""
    i_v, i_bh, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    p_gc = gc + i_bh * T * K
    if _chunk_is_fast(p_gc, i_t, T, K=K, BT=BT, BK=BK) == STRONG:
        return
    NT = tl.cdiv(T, BT)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_k = k + i_bh * T * K
    p_dh = dh + (i_bh * NT + i_t) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        b_gl = tl.load(p_gc + tl.minimum(i_t * BT + BT - 1, T - 1) * K + o_k, mask=m_k, other=0.)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_kd = b_k * tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.))
        b_dv += tl.dot(b_kd, b_dh, input_precision=PREC)
    for i_g in range(G):
        i_hq = i_bh * G + i_g
        p_q = q + i_hq * T * K
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            b_q = tl.load(p_q + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
            b_A = _gla_intra_A(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k, K=K, BT=BT, BC=BC, PREC=PREC,
                               STRONG=STRONG)
        b_do = tl.load(do + i_hq * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dv += tl.dot(tl.trans(b_A), b_do.to(tl.float32), input_precision=PREC)
    tl.store(dv + i_bh * T * V + o_t[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@autotune(configs=warps_stages(warps=(2, 4), stages=(1, 2)), key=["K", "BK", "BT"], default=_default("dg"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dg(dgl, sfx, dg, T, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """dg = (in-chunk reverse cumsum of db) + (sum of db over all later chunks and the final-state term)."""
    i_k, i_bh, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = (o_t < T)[:, None] & m_k[None, :]
    o_tk = i_bh * T * K + o_t[:, None] * K + o_k[None, :]
    b_s = tl.load(sfx + (i_bh * NT + i_t) * K + o_k, mask=m_k, other=0.)
    b_dg = tl.load(dgl + o_tk, mask=m_tk, other=0.) + b_s[None, :]
    tl.store(dg + o_tk, b_dg.to(dg.dtype.element_ty), mask=m_tk)


# ------------------------------------------------------------------------------------------------ host wrappers
def _states(k, v, g, h0, BT, prec, h_dtype):
    """Per-chunk start states h [B, HKV, NT, K, V] (``h_dtype``), in-chunk cumulative gate gc, final state hT."""
    B, HKV, T, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    gc = k.new_empty(B, HKV, T, K, dtype=torch.float32)
    h = k.new_empty(B, HKV, NT, K, V, dtype=torch.float32)
    ht = k.new_empty(B, HKV, K, V, dtype=torch.float32)
    BK, BV = _blocks("local", K, V)
    grid = (NT * B * HKV, triton.cdiv(K, BK), triton.cdiv(V, BV))
    gla_fwd_kernel_local[grid](k=k, v=v, g=g, gc=gc, hl=h, T=T, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec)
    # in place for fp32 states; the forward pass of 16-bit inputs reads them in the input dtype
    hs = h if h_dtype == torch.float32 else torch.empty_like(h, dtype=h_dtype)
    _scan(h, gc, h0, hs, ht, T, BT, reverse=False)
    return hs, gc, ht


def _scan(hl, gc, s0, h, st, T, BT, reverse):
    B, HKV, _, K, V = hl.shape
    grid = (triton.cdiv(K * V, SCAN_BLOCK), B * HKV)
    gla_kernel_scan[grid](hl=hl, gc=gc, s0=s0 if s0 is not None else st, h=h, st=st, T=T, K=K, V=V, BT=BT,
                          BS=SCAN_BLOCK, BU=4 if interpreting() else SCAN_CHUNKS, USE_S0=s0 is not None,
                          REVERSE=reverse)


def _prep(q, k, v, g):
    B, HQ, T, K = q.shape
    HKV = k.shape[1]
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({HKV})")
    dt = common_dtype(q, k, v)
    return [x.to(dt).contiguous() for x in (q, k, v)] + [g.contiguous()]


def chunk_gla_fwd(q, k, v, g, h0: Optional[torch.Tensor] = None):
    """Forward: ``(o [B,HQ,T,V] fp32, hT [B,HKV,K,V] fp32)``; see the module docstring."""
    q, k, v, g = _prep(q, k, v, g)
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    BT = chunk_size(T)
    prec = dot_precision(q.dtype)
    h, gc, ht = _states(k, v, g, None if h0 is None else h0.contiguous(), BT, prec, k.dtype)
    o = q.new_empty(B, HQ, T, V, dtype=torch.float32)
    for strong in (False, True):
        BK, BV = _blocks("o_strong" if strong else "o", K, V)
        grid = (triton.cdiv(V, BV), B * HQ, triton.cdiv(T, BT))
        gla_fwd_kernel_o[grid](q=q, k=k, v=v, gc=gc, h=h, o=o, T=T, G=HQ // HKV, K=K, V=V, BT=BT, BC=BC, BK=BK,
                               BV=BV, PREC=prec, STRONG=strong)
    return o, ht


def chunk_gla_bwd(q, k, v, g, h0, do, dhT):
    """Backward: ``(dq, dk, dv, dg)`` in the input dtypes and ``dh0`` fp32 (``do``/``dhT`` None = zero)."""
    dtypes = (q.dtype, k.dtype, v.dtype, g.dtype)
    q, k, v, g = _prep(q, k, v, g)
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    G = HQ // HKV
    BT = chunk_size(T)
    NT = triton.cdiv(T, BT)
    prec = os.environ.get("LIGERFX_GLA_BWD_PREC", "tf32") if q.dtype != torch.float32 else "ieee"
    do = q.new_zeros(B, HQ, T, V, dtype=torch.float32) if do is None else do.contiguous()
    dhT = None if dhT is None else dhT.contiguous()

    h, gc, ht = _states(k, v, g, None if h0 is None else h0.contiguous(), BT, prec, torch.float32)
    # dh[n]: gradient of chunk n's end state
    dh = torch.empty_like(h)
    dh0 = k.new_empty(B, HKV, K, V, dtype=torch.float32)
    BK, BV = _blocks("dlocal", K, V)
    grid = (NT * B * HKV, triton.cdiv(K, BK), triton.cdiv(V, BV))
    gla_bwd_kernel_dlocal[grid](q=q, gc=gc, do=do, dl=dh, T=T, G=G, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec)
    # grad(end of n - 1) = grad(start of n) = exp(c_last,n) grad(end of n) + dL_n: the forward scan, reversed
    _scan(dh, gc, dhT, dh, dh0, T, BT, reverse=True)

    dq = torch.empty(B, HQ, T, K, dtype=dtypes[0], device=q.device)
    dk = torch.empty(B, HKV, T, K, dtype=dtypes[1], device=q.device)
    dgl = k.new_empty(B, HKV, T, K, dtype=torch.float32)
    dbt = k.new_empty(B, HKV, NT, K, dtype=torch.float32)
    for strong in (False, True):
        BK, BV = _blocks("dqk_strong" if strong else "dqk", K, V)
        grid = (triton.cdiv(K, BK), B * HKV, NT)
        gla_bwd_kernel_dqk[grid](q=q, k=k, v=v, gc=gc, h=h, do=do, dh=dh, dq=dq, dk=dk, dgl=dgl, dbt=dbt, T=T, G=G,
                                 K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV, PREC=prec, STRONG=strong)
    dv = torch.empty(B, HKV, T, V, dtype=dtypes[2], device=q.device)
    for strong in (False, True):
        BK, BV = _blocks("dv_strong" if strong else "dv", K, V)
        grid = (triton.cdiv(V, BV), B * HKV, NT)
        gla_bwd_kernel_dv[grid](q=q, k=k, gc=gc, do=do, dh=dh, dv=dv, T=T, G=G, K=K, V=V, BT=BT, BC=BC, BK=BK,
                                BV=BV, PREC=prec, STRONG=strong)

    # db summed over every later chunk (exclusive suffix sum of the chunk totals), plus rowsum(hT * dhT) everywhere
    sfx = dbt.flip(2).cumsum(2).flip(2) - dbt
    if dhT is not None:
        sfx += (ht * dhT.float()).sum(-1)[:, :, None, :]
    dg = torch.empty(B, HKV, T, K, dtype=dtypes[3], device=q.device)
    BK, _ = _blocks("dg", K, V)
    gla_bwd_kernel_dg[(triton.cdiv(K, BK), B * HKV, NT)](dgl=dgl, sfx=sfx.contiguous(), dg=dg, T=T, K=K, BT=BT,
                                                          BK=BK)
    return dq, dk, dv, dg, dh0
