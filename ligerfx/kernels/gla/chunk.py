"""Chunked gated linear attention (GLA) in Triton: forward and backward, GQA-aware, fp32 state.

Same contract as ``naive.gla_fwd`` / ``naive.gla_bwd_chunked`` (head-first; k, v, g and the state per KV head, q and
o per query head; ``g`` is the log forget gate, ``<= 0``; scale 1)::

    chunk_gla_fwd(q, k, v, g, h0)              -> o [B, HQ, T, V] fp32, hT [B, HKV, K, V] fp32
    chunk_gla_bwd(q, k, v, g, h0, do, dhT)     -> dq, dk, dv, dg (input dtypes), dh0 fp32

Algorithm. Time is cut into chunks of ``BT`` (64) tokens and each chunk into ``NC`` sub-chunks of ``BC`` (16). With
``c`` the in-chunk cumulative gate and ``h_n`` the state at the start of chunk n::

    o_i     = (q_i * exp(c_i)) h_n + sum_{j <= i in chunk} A_ij v_j,   A_ij = sum_d q_id k_jd exp(c_id - c_jd)
    h_{n+1} = diag(exp(c_last)) h_n + (k * exp(c_last - c))^T v

Every exponent is "later minus earlier", so ``<= 0``; kernels also clamp it at 0, so no gate strength overflows.
``A`` is built in registers as a full [BT, BT] tile: a sub-chunk pair (a > b) factorises through the first row ``r``
of sub-chunk a, ``(q_i exp(c_i - c_r)) . (k_j exp(c_r - c_j))`` (both factors <= 1, one tensor-core dot per a, masked
to its rows), and the diagonal sub-chunks are summed element-wise (16 steps). The same two patterns give the gated
intra-chunk parts of dq and dk in the backward pass.

Kernels (one host wrapper each, keyword launches)::

    forward:  gla_fwd_kernel_h (states per chunk, in-chunk cumulative gate, hT)   sequential over chunks
              gla_fwd_kernel_o (inter-chunk + intra-chunk output)                parallel over chunks
    backward: gla_fwd_kernel_h (recompute), gla_bwd_kernel_dh (state gradients, dh0; sequential),
              gla_bwd_kernel_dqk (dq, dk, db = q.dq - k.dk), gla_bwd_kernel_dv, gla_bwd_kernel_dg (reverse cumsum)

The gate gradient uses ``d/db_t = sum_heads q_t dq_t - k_t dk_t`` for the global cumulative gate b, plus
``rowsum(hT * dhT)`` at the last step, then ``dg = reverse_cumsum(db)``. That difference amplifies the relative error
of dq and dk about tenfold, so the backward pass keeps the per-chunk states ``h``, ``dh`` in fp32 and feeds every
dot fp32 operands (tf32 for 16-bit inputs, ``LIGERFX_GLA_BWD_PREC=tf32x3`` for more); the forward pass stores ``h``
in the input dtype and runs its dots in that dtype. Running states are always fp32.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils import autotune, common_dtype, dot_precision, warps_stages

BC = 16  # sub-chunk size (rows of one element-wise diagonal block)
# A chunk (per K block) whose total log decay stays above -FAST_DECAY takes the one-dot intra-chunk path; stronger
# decays take the sub-chunk path, whose exponents are all <= 0.
FAST_DECAY = tl.constexpr(30.0)


def chunk_size(T: int) -> int:
    return min(64, max(BC, triton.next_power_of_2(T)))


# name -> (BK cap, BV cap, num_warps, num_stages): the largest tiles that compile without register spills on sm_90 in
# bf16 inputs (cuobjdump --dump-resource-usage, triton 3.9 offline); the launch config unless LIGERFX_AUTOTUNE=1.
BLOCKS = {"h": (32, 64, 4, 2), "dh": (32, 64, 8, 2), "o": (32, 128, 8, 1), "dqk": (16, 32, 8, 1),
          "dv": (32, 64, 8, 1), "dg": (64, 64, 4, 2)}


def _blocks(name: str, K: int, V: int):
    bk, bv = BLOCKS[name][:2]
    return min(bk, max(16, triton.next_power_of_2(K))), min(bv, max(16, triton.next_power_of_2(V)))


def _default(name: str):
    return lambda kw: triton.Config({}, num_warps=BLOCKS[name][2], num_stages=BLOCKS[name][3])


# ------------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _gla_intra_A(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k,
                 K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr, PREC: tl.constexpr):
    """Adds one K block's share of A[i, j] = sum_d q_id k_jd exp(c_id - c_jd), j <= i, to ``b_A`` [BT, BT]."""
    o_i = tl.arange(0, BT)
    if tl.min(b_gc) > -FAST_DECAY:
        # mild gates: factorise through the chunk start, exp(c_i) <= 1 and exp(-c_j) <= exp(FAST_DECAY)
        b_qg = b_q * tl.exp(b_gc)
        b_kg = b_k * tl.exp(-b_gc)
        b_A += tl.where(o_i[:, None] >= o_i[None, :], tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC), 0.)
    else:
        b_A = _gla_intra_A_strong(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k, K=K, BT=BT, BC=BC, NC=NC,
                                  PREC=PREC)
    return b_A


@triton.jit
def _gla_intra_A_strong(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k,
                        K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr, PREC: tl.constexpr):
    """``_gla_intra_A`` for any gate strength: every exponent stays <= 0."""
    o_i = tl.arange(0, BT)
    for i_c in range(1, NC):
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


# ------------------------------------------------------------------------------------------------------ forward
@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BK", "BV", "BT"], default=_default("h"))
@triton.jit(do_not_specialize=["T"])
def gla_fwd_kernel_h(k, v, g, gc, h, h0, ht, T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_k = k + i_bh * T * K
    p_v = v + i_bh * T * V
    p_g = g + i_bh * T * K
    p_gc = gc + i_bh * T * K
    p_h = h + i_bh * NT * K * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    for i_s in range(NT):
        i_t = tl.cast(i_s, tl.int64)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_tk = m_t[:, None] & m_k[None, :]
        tl.store(p_h + i_t * K * V + o_kv, b_h.to(p_h.dtype.element_ty), mask=m_kv)
        # [BT, BK]; padded rows have g = 0, so their cumulative gate equals the last valid row's
        b_g = tl.load(p_g + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_gc = tl.cumsum(b_g, 0)
        if i_v == 0:
            tl.store(p_gc + o_t[:, None] * K + o_k[None, :], b_gc, mask=m_tk)
        b_gl = tl.sum(b_g, 0)
        b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(p_v + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_kd = b_k * tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.))
        # dot operands in the dtype the states are stored in (fp32 for the backward pass)
        b_kv = tl.dot(tl.trans(b_kd).to(p_h.dtype.element_ty), b_v.to(p_h.dtype.element_ty), input_precision=PREC)
        b_h = b_h * tl.exp(b_gl)[:, None] + b_kv
    tl.store(ht + i_bh * K * V + o_kv, b_h, mask=m_kv)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT", "G"], default=_default("o"))
@triton.jit(do_not_specialize=["T"])
def gla_fwd_kernel_o(q, k, v, gc, h, o, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, PREC_A: tl.constexpr):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    i_bhk = i_bh // G
    NT = tl.cdiv(T, BT)
    NC: tl.constexpr = BT // BC
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q = q + i_bh * T * K
    p_k = k + i_bhk * T * K
    p_gc = gc + i_bhk * T * K
    p_h = h + (i_bhk * NT + i_t) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_o += tl.dot((b_q * tl.exp(b_gc)).to(b_h.dtype), b_h, input_precision=PREC)
        b_A = _gla_intra_A(b_A, b_q.to(tl.float32), b_k.to(tl.float32), b_gc, p_k, p_gc, i_t, T, o_k, m_k,
                           K=K, BT=BT, BC=BC, NC=NC, PREC=PREC_A)
    b_v = tl.load(v + i_bhk * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + i_bh * T * V + o_t[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------- backward
@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BK", "BV", "BT", "G"], default=_default("dh"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dh(q, gc, do, dh, dht, dh0, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr,
                      PREC: tl.constexpr):
    """dh[n] = gradient w.r.t. the state at the END of chunk n; dh0 w.r.t. the initial state."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_gc = gc + i_bh * T * K
    p_dh = dh + i_bh * NT * K * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    for i_s in range(NT):
        i_t = tl.cast(NT - 1 - i_s, tl.int64)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        o_tc = tl.minimum(o_t, T - 1)
        tl.store(p_dh + i_t * K * V + o_kv, b_dh.to(p_dh.dtype.element_ty), mask=m_kv)
        b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        b_gl = tl.load(p_gc + tl.minimum(i_t * BT + BT - 1, T - 1) * K + o_k, mask=m_k, other=0.)
        b_dh *= tl.exp(b_gl)[:, None]
        for i_g in range(G):
            i_hq = i_bh * G + i_g
            b_q = tl.load(q + i_hq * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.)
            b_do = tl.load(do + i_hq * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                           other=0.)
            b_qg = b_q * tl.exp(b_gc)
            b_dh += tl.dot(tl.trans(b_qg), b_do.to(tl.float32), input_precision=PREC)
    tl.store(dh0 + i_bh * K * V + o_kv, b_dh, mask=m_kv)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT", "G"], default=_default("dqk"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dqk(q, k, v, gc, h, do, dh, dq, dk, db, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                       PREC_A: tl.constexpr):
    """dq (per query head), dk and db = sum_heads q*dq - k*dk (per KV head) for one chunk and one K block."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    NC: tl.constexpr = BT // BC
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_k = k + i_bh * T * K
    p_v = v + i_bh * T * V
    p_gc = gc + i_bh * T * K
    p_h = h + (i_bh * NT + i_t) * K * V
    p_dh = dh + (i_bh * NT + i_t) * K * V

    b_k = tl.load(p_k + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_gc = tl.load(p_gc + o_tc[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
    b_gl = tl.load(p_gc + tl.minimum(i_t * BT + BT - 1, T - 1) * K + o_k, mask=m_k, other=0.)
    b_causal = o_i[:, None] >= o_i[None, :]
    # mild gates: one dot per head for the intra-chunk dq and dk (see _gla_intra_A)
    b_fast = tl.min(b_gc) > -FAST_DECAY
    b_kg = b_k * tl.exp(tl.minimum(-b_gc, FAST_DECAY))
    b_dkg = tl.zeros([BT, BK], dtype=tl.float32)

    # inter-chunk dk: v dh^T, decayed to the chunk end
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(p_v + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dk += tl.dot(b_v.to(tl.float32), tl.trans(b_dh.to(tl.float32)), input_precision=PREC)
    b_dk *= tl.exp(tl.minimum(b_gl[None, :] - b_gc, 0.))

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
            b_dq += tl.dot(b_do, tl.trans(b_h.to(tl.float32)), input_precision=PREC)
            b_dA += tl.dot(b_do, tl.trans(b_v.to(tl.float32)), input_precision=PREC)
        b_dq *= tl.exp(b_gc)
        b_dA = tl.where(b_causal, b_dA, 0.)
        if b_fast:
            b_dq += tl.dot(b_dA, b_kg, input_precision=PREC_A) * tl.exp(b_gc)
            b_dkg += tl.dot(tl.trans(b_dA), b_q * tl.exp(b_gc), input_precision=PREC_A)
        else:
            b_dq, b_dk = _gla_bwd_intra_strong(b_dq, b_dk, b_dA, b_q, b_k, b_gc, p_q, p_k, p_gc, i_t, T, o_k, m_k,
                                               K=K, BT=BT, BC=BC, NC=NC, PREC=PREC_A)
        tl.store(dq + i_hq * T * K + o_t[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_db += b_q * b_dq
    b_dk += b_dkg * tl.exp(tl.minimum(-b_gc, FAST_DECAY))
    b_db -= b_k * b_dk
    tl.store(dk + i_bh * T * K + o_t[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(db + i_bh * T * K + o_t[:, None] * K + o_k[None, :], b_db, mask=m_tk)


@triton.jit
def _gla_bwd_intra_strong(b_dq, b_dk, b_dA, b_q, b_k, b_gc, p_q, p_k, p_gc, i_t, T, o_k, m_k, K: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr, PREC: tl.constexpr):
    """Gated intra-chunk parts of dq (one query head) and dk for any gate strength (every exponent <= 0)."""
    o_i = tl.arange(0, BT)
    # intra-chunk, off-diagonal sub-chunks
    for i_c in range(1, NC):
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
    # intra-chunk, diagonal sub-chunks, element-wise
    for i_c in range(BC):
        o_j = (o_i // BC) * BC + i_c
        t_j = i_t * BT + o_j
        m_j = (t_j < T)[:, None] & m_k[None, :]
        b_gj = tl.load(p_gc + tl.minimum(t_j, T - 1)[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.)
        # dq_i += dA[i, j] k_j exp(c_i - c_j) with j = block(i) + i_c <= i
        b_kj = tl.load(p_k + t_j[:, None] * K + o_k[None, :], mask=m_j, other=0.).to(tl.float32)
        b_dAj = tl.sum(tl.where(o_i[None, :] == o_j[:, None], b_dA, 0.), 1)
        b_dq += tl.where(((o_i % BC) >= i_c)[:, None],
                         b_dAj[:, None] * b_kj * tl.exp(tl.minimum(b_gc - b_gj, 0.)), 0.)
        # dk_j += dA[i, j] q_i exp(c_i - c_j) with i = block(j) + i_c >= j
        b_qj = tl.load(p_q + t_j[:, None] * K + o_k[None, :], mask=m_j, other=0.).to(tl.float32)
        b_dAi = tl.sum(tl.where(o_i[:, None] == o_j[None, :], b_dA, 0.), 0)
        b_dk += tl.where(((o_i % BC) <= i_c)[:, None],
                         b_dAi[:, None] * b_qj * tl.exp(tl.minimum(b_gj - b_gc, 0.)), 0.)
    return b_dq, b_dk


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT", "G"], default=_default("dv"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dv(q, k, gc, do, dh, dv, T, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                      PREC_A: tl.constexpr):
    """dv = sum_heads A^T do (intra-chunk) + (k exp(c_last - c)) dh (inter-chunk), per KV head."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    NC: tl.constexpr = BT // BC
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_tc = tl.minimum(o_t, T - 1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_k = k + i_bh * T * K
    p_gc = gc + i_bh * T * K
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
        b_dv += tl.dot(b_kd, b_dh.to(tl.float32), input_precision=PREC)
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
            b_A = _gla_intra_A(b_A, b_q, b_k, b_gc, p_k, p_gc, i_t, T, o_k, m_k,
                               K=K, BT=BT, BC=BC, NC=NC, PREC=PREC_A)
        b_do = tl.load(do + i_hq * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dv += tl.dot(tl.trans(b_A), b_do.to(tl.float32), input_precision=PREC)
    tl.store(dv + i_bh * T * V + o_t[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@autotune(configs=warps_stages(warps=(2, 4), stages=(1, 2)), key=["K", "V", "BK", "BV", "BT"], default=_default("dg"))
@triton.jit(do_not_specialize=["T"])
def gla_bwd_kernel_dg(db, ht, dht, dg, T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, USE_DHT: tl.constexpr):
    """dg_t = sum_{s >= t} db_s (+ rowsum(hT * dhT) for every t, the last step's extra term)."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = tl.cast(i_bh, tl.int64)
    NT = tl.cdiv(T, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_db = db + i_bh * T * K
    p_dg = dg + i_bh * T * K

    b_c = tl.zeros([BK], dtype=tl.float32)
    if USE_DHT:
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = m_k[:, None] & (o_v < V)[None, :]
            o_kv = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
            b_ht = tl.load(ht + o_kv, mask=m_kv, other=0.)
            b_dht = tl.load(dht + o_kv, mask=m_kv, other=0.).to(tl.float32)
            b_c += tl.sum(b_ht * b_dht, 1)
    for i_s in range(NT):
        i_t = tl.cast(NT - 1 - i_s, tl.int64)
        o_t = i_t * BT + tl.arange(0, BT)
        m_tk = (o_t < T)[:, None] & m_k[None, :]
        b_db = tl.load(p_db + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_dg = tl.cumsum(b_db, 0, reverse=True) + b_c[None, :]
        tl.store(p_dg + o_t[:, None] * K + o_k[None, :], b_dg.to(p_dg.dtype.element_ty), mask=m_tk)
        b_c += tl.sum(b_db, 0)


# ------------------------------------------------------------------------------------------------ host wrappers
def _fwd_h(k, v, g, h0, BT, h_dtype):
    B, HKV, T, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    BK, BV = _blocks("h", K, V)
    h = k.new_empty(B, HKV, NT, K, V, dtype=h_dtype)
    gc = k.new_empty(B, HKV, T, K, dtype=torch.float32)
    ht = k.new_empty(B, HKV, K, V, dtype=torch.float32)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * HKV)
    gla_fwd_kernel_h[grid](k=k, v=v, g=g, gc=gc, h=h, h0=h0 if h0 is not None else ht, ht=ht, T=T, K=K, V=V,
                           BT=BT, BK=BK, BV=BV, USE_H0=h0 is not None, PREC=dot_precision(k.dtype))
    return h, gc, ht


def _fwd_o(q, k, v, gc, h, BT):
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    BK, BV = _blocks("o", K, V)
    o = q.new_empty(B, HQ, T, V, dtype=torch.float32)
    grid = (triton.cdiv(V, BV), triton.cdiv(T, BT), B * HQ)
    gla_fwd_kernel_o[grid](q=q, k=k, v=v, gc=gc, h=h, o=o, T=T, G=HQ // HKV, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV,
                           PREC=dot_precision(q.dtype), PREC_A=dot_precision(q.dtype))
    return o


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
    BT = chunk_size(q.shape[2])
    h, gc, ht = _fwd_h(k, v, g, None if h0 is None else h0.contiguous(), BT, k.dtype)
    return _fwd_o(q, k, v, gc, h, BT), ht


def chunk_gla_bwd(q, k, v, g, h0, do, dhT):
    """Backward: ``(dq, dk, dv, dg)`` in the input dtypes and ``dh0`` fp32 (``do``/``dhT`` None = zero)."""
    dtypes = (q.dtype, k.dtype, v.dtype, g.dtype)
    q, k, v, g = _prep(q, k, v, g)
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    G = HQ // HKV
    BT = chunk_size(T)
    NT = triton.cdiv(T, BT)
    # fp32 states and fp32 dot operands (tf32 for 16-bit inputs): the gate gradient comes from the difference
    # q.dq - k.dk, which amplifies the relative error of dq and dk about tenfold
    prec = os.environ.get("LIGERFX_GLA_BWD_PREC", dot_precision(q.dtype)) if q.dtype != torch.float32 else "ieee"
    do = q.new_zeros(B, HQ, T, V, dtype=torch.float32) if do is None else do.contiguous()
    dhT = None if dhT is None else dhT.contiguous()

    h, gc, ht = _fwd_h(k, v, g, None if h0 is None else h0.contiguous(), BT, torch.float32)
    dh = torch.empty_like(h)
    dh0 = k.new_empty(B, HKV, K, V, dtype=torch.float32)
    BK, BV = _blocks("dh", K, V)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * HKV)
    gla_bwd_kernel_dh[grid](q=q, gc=gc, do=do, dh=dh, dht=dhT if dhT is not None else dh0, dh0=dh0, T=T, G=G, K=K,
                            V=V, BT=BT, BK=BK, BV=BV, USE_DHT=dhT is not None, PREC=prec)

    dq = torch.empty(B, HQ, T, K, dtype=dtypes[0], device=q.device)
    dk = torch.empty(B, HKV, T, K, dtype=dtypes[1], device=q.device)
    db = k.new_empty(B, HKV, T, K, dtype=torch.float32)
    BK, BV = _blocks("dqk", K, V)
    grid = (triton.cdiv(K, BK), NT, B * HKV)
    gla_bwd_kernel_dqk[grid](q=q, k=k, v=v, gc=gc, h=h, do=do, dh=dh, dq=dq, dk=dk, db=db, T=T, G=G, K=K, V=V,
                             BT=BT, BC=BC, BK=BK, BV=BV, PREC=prec, PREC_A=prec)

    dv = torch.empty(B, HKV, T, V, dtype=dtypes[2], device=q.device)
    BK, BV = _blocks("dv", K, V)
    grid = (triton.cdiv(V, BV), NT, B * HKV)
    gla_bwd_kernel_dv[grid](q=q, k=k, gc=gc, do=do, dh=dh, dv=dv, T=T, G=G, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV,
                            PREC=prec, PREC_A=prec)

    dg = torch.empty(B, HKV, T, K, dtype=dtypes[3], device=q.device)
    BK, BV = _blocks("dg", K, V)
    grid = (triton.cdiv(K, BK), B * HKV)
    gla_bwd_kernel_dg[grid](db=db, ht=ht, dht=dhT if dhT is not None else ht, dg=dg, T=T, K=K, V=V, BT=BT, BK=BK,
                            BV=BV, USE_DHT=dhT is not None)
    return dq, dk, dv, dg, dh0
