"""Liger attention forward, chunk-parallel: feature maps, gate, GLA, sliding window and mix in two Triton phases.

Same contract as ``naive.liger_fwd`` / ``naive.liger_bwd`` (see there for shapes)::

    liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix, gate_normalizer)
        -> o [B, HQ, T, V] (v's dtype), hT [B, HKV, K, V] fp32, lse [B, HQ, T] fp32
    liger_bwd(...)  -> naive.liger_bwd with the Triton GLA and window kernels

Time is cut into chunks of ``BT`` tokens. Per chunk, with ``phi_k = softmax(k_pre)``, ``g = logsigmoid(gate_src) /
gate_normalizer`` (fp32, derived in-kernel; padded tokens have phi_k = v = g = 0), ``c`` the in-chunk cumulative
log gate and ``h_n`` the state entering chunk n (per KV head, fp32)::

    phase 1  L_n     = (phi_k exp(c_last - c))^T v,  d_n = c_last     liger_fwd_kernel_local: grid (V blk, chunk, B*HKV)
             h_{n+1} = diag(exp(d_n)) h_n + L_n                       gla/chunk.py's scan, element-wise over chunks
    phase 2  o_gla   = (phi_q exp(c)) h_n + A v,  A_ij = sum_d phi_q,id phi_k,jd exp(c_id - c_jd)  (j <= i)
             o_swa   = softmax over the keys (k_rope, v) of this chunk and the ceil(window / BT) chunks before it;
                       positions decide visibility (0 <= pos_t - pos_j <= window, pos >= 0); lse stored
             o       = mix * o_gla + (1 - mix) * o_swa (fp32), written once in v's dtype
                                                    liger_fwd_kernel_o: grid (V blk x head of group, chunk, B*HKV)

Phase 1 writes the chunk summaries L_n (fp32) where the states go (the scan reads every element before it
overwrites it) and the chunk decays ``d_n`` [B, HKV, NT, K]; the scan is ``gla_kernel_scan`` run over the NT chunk
summaries (its "gate" is ``d``, one row per chunk). ``LIGERFX_LIGER_PHASE1=seq`` instead runs phase 1 as one
sequential pass per (V block, B*HKV) (``liger_fwd_kernel_states_seq``: state in registers, h_n written once; less
traffic, less parallelism). The states h_n [B, HKV, NT, K, V] are fp32, or bf16 with ``LIGERFX_LIGER_STATES=bf16``.
Phase 2 programs are independent: every chunk of every head runs in parallel, each reading its chunk's inputs once
(plus the previous chunks' k_rope / v / positions for the window; the query heads of a group and the V blocks of a
head are adjacent in launch order, so their shared key-side reads mostly hit L2). One query head per program by
default (``_heads_per_program``).

Intra-chunk scores take one dot through the chunk start when the chunk's total log decay stays above
``-FAST_DECAY`` in every key dim (every realistic Liger gate); other chunks take the sub-chunk path of
``gla/chunk.py`` (every exponent <= 0, any gate strength) with phi_k and c kept in registers. The two paths are two
compilations of the phase-2 kernel (``STRONG``), both launched; a program whose chunk belongs to the other path
leaves after reading d_n (no host sync decides). Dot operands: bf16 for bf16 inputs (tensor cores, fp32
accumulation), fp32 otherwise (fp16: ``exp(-c)`` up to ``exp(FAST_DECAY)`` overflows fp16; fp32: ieee).

HBM traffic (``traffic_bytes``): per token, s = input element size (2), K, V head dims, C = BT, states fp32 (4 B);
re-reads by other V blocks, the heads of a group and the window's next chunks counted as L2 hits::

    local (phase 1)   per KV head:  read k_pre, gate_src, v s(2K+V); write L_n 4KV/C, d_n 4K/C
    scan  (phase 1)   per KV head:  read L_n 4KV/C, d_n 4K/C; write h_n 4KV/C
    seq   (phase 1)   per KV head:  read k_pre, gate_src, v s(2K+V); write h_n 4KV/C, d_n 4K/C  (replaces both)
    output (phase 2)  per KV head:  read k_pre, gate_src, v, k_rope s(3K+V), h_n 4KV/C, d_n 4K/C
                      per Q head:   read q_pre, q_rope s(2K); write o sV, lse 4

    bytes per token and head (HQ = HKV)   local   scan   phase 2   total   | seq: phase 1  total | floor
    D = 64,  C = 64                          644    516     1,160   2,320   |        644   1,804 |   900
    D = 128, C = 64                        1,800  2,056     2,828   6,684   |      1,800   4,628 | 1,796
    D = 256, C = 32                        9,760 16,416    11,812  37,988   |      9,760  21,572 | 3,588

The floor reads the six inputs and writes o and lse once. The fp32 states dominate from D = 128 (4 KB of 6.7 KB;
at D = 256, where the chunk must be 32 tokens to fit the registers, 32 KB of 38 KB); bf16 states save 2KV/C twice
(D = 128: 5.7 KB scan / 3.6 KB seq). At D = 128, T = 32K, B = 1, H = 32: 7.0 GB (4.9 GB seq), about 1.5 ms
(1.0 ms) at 4.8 TB/s.

Assumption of the window branch: every key a query sees lies at most ``window`` token indices before it, which holds
when padding sits only at the ends of each row (left- or right-padded batches, no padding). Rows with padding in
the middle need the unfused path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..gla import chunk
from ..gla.chunk import FAST_DECAY
from ..swa import window as swa_window
from ..utils import autotune, dot_precision, warps_stages
from . import naive

LOG2E = 1.4426950408889634
BC = chunk.BC

# head dim -> (BT, BV cap, num_warps, num_stages) of the phase-2 kernel and (BV cap, num_warps, num_stages) of the
# local kernel (the launch configs unless LIGERFX_AUTOTUNE=1), from benchmarks/liger_fused_spills.py (triton 3.9,
# sm_90a, bf16, ptxas -v, one query head per program); not yet timed on a card. Phase 2: D=64 no spills; D=128 36 B
# of spills on the one-dot path (692 B on the strong-gate path), kept for BV = V (with BV=64: 84 B, every V block
# recomputes the scores and the window softmax); D=256 needs BT=32 (BT=64 spills >1 KB), no spills on the one-dot
# path (176 B strong). Local kernel: no spills. Override, e.g. LIGERFX_LIGER_BLOCKS="128=64,64,8,1;256=32,32,8,1".
BLOCKS = {64: (64, 64, 8, 1), 128: (64, 128, 8, 1), 256: (32, 64, 8, 1)}
LOCAL_BLOCKS = {64: (64, 4, 1), 128: (128, 8, 1), 256: (128, 8, 1)}
# phase 1 as one sequential pass (``LIGERFX_LIGER_PHASE1=seq``): (BV cap, num_warps, num_stages); small V blocks
# for parallelism, stages > 1 so the next chunk's loads overlap the state update (spills: D=64 0, D=128 132 B,
# D=256 40 B)
SEQ_BLOCKS = {64: (32, 8, 2), 128: (32, 8, 2), 256: (32, 8, 2)}
for _item in filter(None, os.environ.get("LIGERFX_LIGER_BLOCKS", "").split(";")):
    _name, _vals = _item.split("=")
    BLOCKS[int(_name)] = tuple(int(x) for x in _vals.split(","))
# dtype of the stored chunk states read by phase 2 ("fp32", or "bf16": half the state traffic of the scan's write
# and phase 2's read; phase 2 rounds them to bf16 for its dot anyway when the inputs are bf16)
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _dim(K: int, V: int) -> int:
    return min(256, max(64, triton.next_power_of_2(max(K, V))))


def _blocks(K: int, V: int, T: int):
    BT, BV, warps, stages = BLOCKS[_dim(K, V)]
    return min(BT, max(BC, triton.next_power_of_2(T))), min(BV, max(16, triton.next_power_of_2(V))), warps, stages


def _heads_per_program(G: int) -> int:
    """Query heads per phase-2 program: 1 unless ``LIGERFX_LIGER_GP=n`` (then the largest divisor of G <= n).

    A program looping over several heads of a group keeps the key side (phi_k exp(-c), exp(c), h_n, v) live across
    the loop: at D = 128, BT = BV = 64, 8 warps that is 2.3 KB of register spills for 4 heads against 132 B for one
    (sm_90a, ``benchmarks/liger_fused_spills.py``). The heads of a group are adjacent in the launch order instead,
    so their programs read the key side mostly from L2 (and recompute feature maps and gate per head)."""
    cap = int(os.environ.get("LIGERFX_LIGER_GP", "1"))
    return next(d for d in range(G, 0, -1) if G % d == 0 and d <= max(cap, 1))


def traffic_bytes(B: int, HQ: int, HKV: int, T: int, K: int, V: int, s: int = 2, state_bytes: int = 4,
                  phase1: str = "scan") -> dict:
    """Model of the forward's HBM bytes per launch: every tile read once from HBM; re-reads by other V blocks, by
    the heads of a group and by the window of the next chunks are counted as L2 hits (not in the model)."""
    BT = _blocks(K, V, T)[0]
    NT = triton.cdiv(T, BT)
    kv, q = B * HKV * T, B * HQ * T
    L = B * HKV * NT * K * V * 4  # fp32 chunk summaries
    hs = B * HKV * NT * K * V * state_bytes  # states read by phase 2
    dec = B * HKV * NT * K * 4
    inputs1 = kv * s * (2 * K + V)
    out = {"phase2": kv * s * (3 * K + V) + hs + dec + q * (s * (2 * K + V) + 4)}
    if phase1 == "seq":
        out["phase1"] = inputs1 + hs + dec
    else:
        out["local"] = inputs1 + L + dec
        out["scan"] = L + dec + hs
    return out


def _default(name: str):
    def pick(kw):
        if name == "local":
            _, warps, stages = LOCAL_BLOCKS[_dim(kw["K"], kw["V"])]
        elif name == "seq":
            _, warps, stages = SEQ_BLOCKS[_dim(kw["K"], kw["V"])]
        else:
            _, _, warps, stages = _blocks(kw["K"], kw["V"], 1 << 20)
        return triton.Config({}, num_warps=warps, num_stages=stages)
    return pick


@triton.jit
def _softmax_rows(b_x, m_k):
    """Softmax of every row of b_x over its valid columns (fp32)."""
    b_x = tl.where(m_k[None, :], b_x.to(tl.float32), float("-inf"))
    b_e = tl.exp(b_x - tl.max(b_x, 1)[:, None])
    return b_e / tl.sum(b_e, 1)[:, None]


@triton.jit
def _positions(p_pos, o_t, T, HAS_POS: tl.constexpr):
    """Positions of rows o_t (-1 outside [0, T) or for padding)."""
    m_t = (o_t >= 0) & (o_t < T)
    if HAS_POS:
        b_p = tl.load(p_pos + o_t, mask=m_t, other=-1).to(tl.int32)
    else:
        b_p = tl.where(m_t, o_t, -1).to(tl.int32)
    return b_p


@triton.jit
def _key_side(p_kp, p_g, o_t, m_t, m_val, o_k, m_k, s_kp_t, s_g_t, inv_norm):
    """phi_k (zero on padded rows) and the in-chunk cumulative log gate c (padded rows: g = 0), fp32 [BT, BK]."""
    m_tk = m_t[:, None] & m_k[None, :]
    b_k = _softmax_rows(tl.load(p_kp + (o_t * s_kp_t)[:, None] + o_k[None, :], mask=m_tk, other=0.), m_k)
    b_k = tl.where(m_val[:, None], b_k, 0.)
    # logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|))
    b_g = tl.load(p_g + (o_t * s_g_t)[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_g = tl.where(m_val[:, None] & m_k[None, :], (tl.minimum(b_g, 0.) - tl.log(1. + tl.exp(-tl.abs(b_g)))) * inv_norm,
                   0.)
    return b_k, tl.cumsum(b_g, 0)


@triton.jit
def _row_of_subchunk(b_x, i_c, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """[BT, BK]: row i is b_x's row (i // BC) * BC + i_c (the i_c-th row of i's sub-chunk), from registers."""
    b_x3 = tl.reshape(b_x, (BT // BC, BC, BK))
    b_r = tl.sum(tl.where((tl.arange(0, BC) == i_c)[None, :, None], b_x3, 0.), 1)
    return tl.reshape(tl.broadcast_to(b_r[:, None, :], (BT // BC, BC, BK)), (BT, BK))


@triton.jit
def _intra_A_strong(b_q, b_k, b_c, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A[i, j] = sum_d q_id k_jd exp(c_id - c_jd), j <= i, every exponent <= 0 (fp32; q, k, c [BT, BK] fp32)."""
    o_i = tl.arange(0, BT)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_c in range(1, BT // BC):
        # query sub-chunk i_c against the earlier rows, factorised through its first row
        b_gr = tl.sum(tl.where((o_i == i_c * BC)[:, None], b_c, 0.), 0)
        b_qr = b_q * tl.exp(tl.minimum(b_c - b_gr[None, :], 0.))
        b_kr = b_k * tl.exp(tl.minimum(b_gr[None, :] - b_c, 0.))
        m_r = ((o_i // BC) == i_c)[:, None] & (o_i < i_c * BC)[None, :]
        b_A += tl.where(m_r, tl.dot(b_qr, tl.trans(b_kr), input_precision=PREC), 0.)
    for i_c in range(BC):
        # diagonal sub-chunks, element-wise: key row j = (first row of i's sub-chunk) + i_c for every query row i
        b_kj = _row_of_subchunk(b_k, i_c, BT, BC, BK)
        b_gj = _row_of_subchunk(b_c, i_c, BT, BC, BK)
        b_a = tl.sum(b_q * b_kj * tl.exp(tl.minimum(b_c - b_gj, 0.)), 1)
        o_j = (o_i // BC) * BC + i_c
        m_j = (o_i[None, :] == o_j[:, None]) & ((o_i % BC) >= i_c)[:, None]
        b_A += tl.where(m_j, b_a[:, None], 0.)
    return b_A


# ------------------------------------------------------------------------------------------------------ phase 1
@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BT", "BK", "BV"],
          default=_default("local"))
@triton.jit(do_not_specialize=["T"])
def liger_fwd_kernel_local(k_pre, gate, v, pos, hl, dec, s_kp_b, s_kp_h, s_kp_t, s_g_b, s_g_h, s_g_t, s_v_b, s_v_h,
                           s_v_t, T, HKV, inv_norm, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, HAS_POS: tl.constexpr, PREC: tl.constexpr):
    """Chunk summary L_n = (phi_k exp(c_last - c))^T v (fp32) and chunk decay d_n = c_last (stored by i_v == 0)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # row offsets (t * stride_t) fit int32 (``_rows``): only the batch / head offsets are int64
    i_bh = tl.cast(i_bh, tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    NT = tl.cdiv(T, BT)
    DT = v.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_val = _positions(pos + i_b * T, o_t, T, HAS_POS) >= 0

    b_k, b_c = _key_side(k_pre + i_b * s_kp_b + i_h * s_kp_h, gate + i_b * s_g_b + i_h * s_g_h, o_t, m_t, m_val,
                         o_k, m_k, s_kp_t, s_g_t, inv_norm)
    # the cumsum's own last row (rows past T add 0), so every exponent below is <= 0
    b_cl = tl.sum(tl.where((o_i == BT - 1)[:, None], b_c, 0.), 0)
    b_kd = (b_k * tl.exp(tl.minimum(b_cl[None, :] - b_c, 0.))).to(DT)
    b_v = tl.load(v + i_b * s_v_b + i_h * s_v_h + (o_t * s_v_t)[:, None] + o_v[None, :],
                  mask=m_val[:, None] & m_v[None, :], other=0.)
    b_l = tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    p_n = i_bh * NT + i_t
    tl.store(hl + p_n * K * V + o_k[:, None] * V + o_v[None, :], b_l, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(dec + p_n * K + o_k, b_cl, mask=m_k)


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2, 3)), key=["K", "V", "BT", "BK", "BV"],
          default=_default("seq"))
@triton.jit(do_not_specialize=["T"])
def liger_fwd_kernel_states_seq(k_pre, gate, v, pos, h0, h, dec, ht, s_kp_b, s_kp_h, s_kp_t, s_g_b, s_g_h, s_g_t,
                                s_v_b, s_v_h, s_v_t, T, HKV, inv_norm, K: tl.constexpr, V: tl.constexpr,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_POS: tl.constexpr,
                                USE_H0: tl.constexpr, PREC: tl.constexpr):
    """Phase 1 in one pass: walks the chunks with its [K, BV] state slice in fp32 registers, storing h_n (the state
    entering chunk n), d_n (i_v == 0) and hT. Reads the inputs once and writes the states once (no L_n round trip),
    but the chunks are sequential: parallel over B * HKV * V blocks only."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = tl.cast(i_bh, tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    NT = tl.cdiv(T, BT)
    DT = v.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kp = k_pre + i_b * s_kp_b + i_h * s_kp_h
    p_g = gate + i_b * s_g_b + i_h * s_g_h
    p_v = v + i_b * s_v_b + i_h * s_v_h
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
    for i_t in range(NT):
        o_t = i_t * BT + o_i
        m_t = o_t < T
        m_val = _positions(pos + i_b * T, o_t, T, HAS_POS) >= 0
        p_n = i_bh * NT + i_t
        tl.store(h + p_n * K * V + o_k[:, None] * V + o_v[None, :], b_h.to(h.dtype.element_ty), mask=m_kv)
        b_k, b_c = _key_side(p_kp, p_g, o_t, m_t, m_val, o_k, m_k, s_kp_t, s_g_t, inv_norm)
        b_cl = tl.sum(tl.where((o_i == BT - 1)[:, None], b_c, 0.), 0)
        if i_v == 0:
            tl.store(dec + p_n * K + o_k, b_cl, mask=m_k)
        b_kd = (b_k * tl.exp(tl.minimum(b_cl[None, :] - b_c, 0.))).to(DT)
        b_v = tl.load(p_v + (o_t * s_v_t)[:, None] + o_v[None, :], mask=m_val[:, None] & m_v[None, :], other=0.)
        b_h = b_h * tl.exp(b_cl)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    tl.store(ht + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


# ------------------------------------------------------------------------------------------------------ phase 2
@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BT", "BK", "BV", "GP", "STRONG"],
          default=_default("o"))
@triton.jit(do_not_specialize=["T", "window"])
def liger_fwd_kernel_o(q_pre, k_pre, gate, v, q_rope, k_rope, pos, h, dec, o, lse,
                       s_qp_b, s_qp_h, s_qp_t, s_kp_b, s_kp_h, s_kp_t, s_g_b, s_g_h, s_g_t, s_v_b, s_v_h, s_v_t,
                       s_qr_b, s_qr_h, s_qr_t, s_kr_b, s_kr_h, s_kr_t,
                       T, HKV, window, qk_scale, mix, inv_norm, NW: tl.constexpr, G: tl.constexpr,
                       GP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, HAS_POS: tl.constexpr, GLA_F32: tl.constexpr,
                       PREC: tl.constexpr, STRONG: tl.constexpr):
    i_vg, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = tl.cast(i_bh, tl.int64)
    NV = tl.cdiv(V, BV)
    i_v, i_gp = i_vg % NV, i_vg // NV
    i_b, i_h = i_bh // HKV, i_bh % HKV
    NT = tl.cdiv(T, BT)
    p_n = i_bh * NT + i_t
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # the chunk's total log decay decides the path (the same answer in both launches)
    b_d = tl.load(dec + p_n * K + o_k, mask=m_k, other=0.)
    if (tl.min(b_d, 0) > -FAST_DECAY) == STRONG:
        return
    # dot operands of the recurrent branch: v's dtype for bf16 (tensor cores), fp32 otherwise; window: v's dtype
    DT = v.dtype.element_ty
    if GLA_F32:
        DG = tl.float32
    else:
        DG = DT
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    m_tk = m_t[:, None] & m_k[None, :]
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_pos = pos + i_b * T
    p_v = v + i_b * s_v_b + i_h * s_v_h
    p_kr = k_rope + i_b * s_kr_b + i_h * s_kr_h
    b_pt = _positions(p_pos, o_t, T, HAS_POS)
    m_val = b_pt >= 0

    b_k, b_c = _key_side(k_pre + i_b * s_kp_b + i_h * s_kp_h, gate + i_b * s_g_b + i_h * s_g_h, o_t, m_t, m_val,
                         o_k, m_k, s_kp_t, s_g_t, inv_norm)
    b_ec = tl.exp(b_c)
    if not STRONG:
        # exp(-c) <= exp(FAST_DECAY) on this path
        b_kg = (b_k * tl.exp(tl.minimum(-b_c, FAST_DECAY))).to(DG)
    b_h = tl.load(h + p_n * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                  other=0.).to(DG)
    b_v = tl.load(p_v + (o_t * s_v_t)[:, None] + o_v[None, :], mask=m_val[:, None] & m_v[None, :], other=0.)

    for i_g in range(GP):
        i_hq = i_h * G + i_gp * GP + i_g
        p_o = o + (i_b * HKV * G + i_hq) * T * V
        # recurrent branch: inter-chunk (state entering the chunk) + intra-chunk
        b_q = _softmax_rows(tl.load(q_pre + i_b * s_qp_b + i_hq * s_qp_h + (o_t * s_qp_t)[:, None] + o_k[None, :],
                                    mask=m_tk, other=0.), m_k)
        b_qg = (b_q * b_ec).to(DG)
        b_o = tl.dot(b_qg, b_h, input_precision=PREC)
        if STRONG:
            b_A = _intra_A_strong(b_q, b_k, b_c, BT=BT, BC=BC, BK=BK, PREC=PREC)
        else:
            b_A = tl.where(o_i[:, None] >= o_i[None, :], tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC), 0.)
        b_o += tl.dot(b_A.to(DG), b_v.to(DG), input_precision=PREC)

        # window branch: online softmax over this chunk and the NW chunks before it (log2 units)
        b_qr = tl.load(q_rope + i_b * s_qr_b + i_hq * s_qr_h + (o_t * s_qr_t)[:, None] + o_k[None, :], mask=m_tk,
                       other=0.)
        b_acc = tl.zeros([BT, BV], dtype=tl.float32)
        b_l = tl.zeros([BT], dtype=tl.float32)
        b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
        # a constant trip count (a start at max(NW - i_t, 0) costs registers: 36 -> 232 B of spills at D = 128);
        # chunks before the first one are fully masked
        for i_w in range(NW + 1):
            o_n = (i_t - NW + i_w) * BT + o_i
            m_n = (o_n >= 0) & (o_n < T)
            b_pn = _positions(p_pos, o_n, T, HAS_POS)
            b_kr = tl.load(p_kr + (o_n * s_kr_t)[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                           other=0.)
            b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=PREC) * qk_scale
            b_dp = b_pt[:, None] - b_pn[None, :]
            m_vis = m_val[:, None] & (b_pn >= 0)[None, :] & (b_dp >= 0) & (b_dp <= window)
            b_s = tl.where(m_vis, b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            # rows that have seen no key yet keep m = -inf; shift them by 0 so that exp2 gives 0, not NaN
            b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
            b_p = tl.exp2(b_s - b_ms[:, None])
            b_alpha = tl.exp2(b_m - b_ms)
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            if i_w == NW:
                b_vn = b_v
            else:
                b_vn = tl.load(p_v + (o_n * s_v_t)[:, None] + o_v[None, :], mask=m_n[:, None] & m_v[None, :],
                               other=0.)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(DT), b_vn, input_precision=PREC)
            b_m = b_mn
        m_l = b_l > 0
        b_os = tl.where(m_l[:, None], b_acc / tl.where(m_l, b_l, 1.)[:, None], 0.)

        b_o = mix * b_o + (1. - mix) * b_os
        tl.store(p_o + (o_t * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if i_v == 0:
            b_lse = tl.where(m_l, (b_m + tl.log2(tl.where(m_l, b_l, 1.))) / 1.4426950408889634, float("-inf"))
            tl.store(lse + (i_b * HKV * G + i_hq) * T + o_t, b_lse, mask=m_t)


# ----------------------------------------------------------------------------------------------------- backward
# The backward pass runs the GLA and window backward kernels on materialised branch inputs; these two row-wise
# kernels replace the PyTorch passes around them (feature maps and gate in, their derivatives out).
ROW_IDENTITY, ROW_SOFTMAX, ROW_LOGSIGMOID = 0, 1, 2


@triton.jit
def _row_tile(T, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Rows of a program on the (row blocks, heads, batch) grid of the row-wise kernels: head, batch (int64), row and
    column offsets, the column mask and the [BT, BK] bounds mask."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    return i_h, i_b, o_t, o_k, m_k, (o_t < T)[:, None] & m_k[None, :]


@triton.jit(do_not_specialize=["T"])
def liger_bwd_kernel_prep(x, pos, y, s_b, s_h, s_t, T, H, inv_norm, K: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, FN: tl.constexpr, MASK: tl.constexpr, HAS_POS: tl.constexpr):
    """y = fn(x) per row (identity, softmax, logsigmoid * inv_norm), zero on padded rows if MASK; y contiguous."""
    i_h, i_b, o_t, o_k, m_k, m_tk = _row_tile(T, K, BT, BK)
    b_x = tl.load(x + i_b * s_b + i_h * s_h + (o_t * s_t)[:, None] + o_k[None, :], mask=m_tk, other=0.)
    if FN == 1:
        b_y = _softmax_rows(b_x, m_k)
    elif FN == 2:
        b_x = b_x.to(tl.float32)
        b_y = (tl.minimum(b_x, 0.) - tl.log(1. + tl.exp(-tl.abs(b_x)))) * inv_norm
    else:
        b_y = b_x
    if MASK:
        b_y = tl.where((_positions(pos + i_b * T, o_t, T, HAS_POS) >= 0)[:, None], b_y, 0.)
    tl.store(y + ((i_b * H + i_h) * T + o_t)[:, None] * K + o_k[None, :], b_y.to(y.dtype.element_ty), mask=m_tk)


@triton.jit(do_not_specialize=["T"])
def liger_bwd_kernel_finish(x, dy, dz, pos, dx, s_b, s_h, s_t, T, H, inv_norm, K: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, FN: tl.constexpr, MASK: tl.constexpr, HAS_POS: tl.constexpr,
                            USE_DZ: tl.constexpr):
    """dx = fn'(x)^T (dy * mask) [+ dz] per row, for y = fn(x) * mask as in the prep kernel; dy, dz, dx contiguous."""
    i_h, i_b, o_t, o_k, m_k, m_tk = _row_tile(T, K, BT, BK)
    o_r = ((i_b * H + i_h) * T + o_t)[:, None] * K + o_k[None, :]
    b_dy = tl.load(dy + o_r, mask=m_tk, other=0.).to(tl.float32)
    if MASK:
        b_dy = tl.where((_positions(pos + i_b * T, o_t, T, HAS_POS) >= 0)[:, None], b_dy, 0.)
    if FN == 0:
        b_dx = b_dy
    else:
        b_x = tl.load(x + i_b * s_b + i_h * s_h + (o_t * s_t)[:, None] + o_k[None, :], mask=m_tk, other=0.)
        if FN == 1:
            # softmax: p * (dy - sum(p * dy))
            b_p = _softmax_rows(b_x, m_k)
            b_dx = b_p * (b_dy - tl.sum(b_p * b_dy, 1)[:, None])
        else:
            # logsigmoid: sigmoid(-x) dy, with exp(-|x|) (no overflow for large x)
            b_x = b_x.to(tl.float32)
            b_e = tl.exp(-tl.abs(b_x))
            b_dx = b_dy * inv_norm * tl.where(b_x >= 0, b_e, 1.) / (1. + b_e)
    if USE_DZ:
        b_dx += tl.load(dz + o_r, mask=m_tk, other=0.).to(tl.float32)
    tl.store(dx + o_r, b_dx.to(dx.dtype.element_ty), mask=m_tk)


@triton.jit
def liger_bwd_kernel_gate_carry(h, ht, dh, sfx, NT, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr):
    """sfx[n] = rowsum(h_end,n * dh[n]): the gate gradient every row of chunk n receives from the chunk's end state
    (h_end,n = h[n + 1], or hT for the last chunk; dh[n] = gradient of chunk n's end state)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_bh = tl.cast(i_t, tl.int64), tl.cast(i_bh, tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    if i_t == NT - 1:
        p_h = ht + i_bh * K * V
    else:
        p_h = h + (i_bh * NT + i_t + 1) * K * V
    p_dh = dh + (i_bh * NT + i_t) * K * V
    b_s = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_s += tl.sum(b_h * b_dh, 1)
    tl.store(sfx + (i_bh * NT + i_t) * K + o_k, b_s, mask=m_k)


# ------------------------------------------------------------------------------------------------ host wrappers
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride along its last dim and in-row offsets (t * stride_t) that fit int32; other strides are
    passed to the kernel as they are."""
    ok = x.stride(-1) == 1 and x.shape[2] * x.stride(2) < 2 ** 31
    return x if ok else x.contiguous()


def _strides(**xs):
    out = {}
    for name, x in xs.items():
        out.update({f"s_{name}_b": x.stride(0), f"s_{name}_h": x.stride(1), f"s_{name}_t": x.stride(2)})
    return out


def liger_fwd_states(k_pre, v, gate_src, pos, h0, BT: int, gate_normalizer: float, state_dtype=torch.float32):
    """Phase 1: states entering every chunk h [B, HKV, NT, K, V] (``state_dtype``; computed in fp32), chunk decays
    d [B, HKV, NT, K] fp32 and the final state hT [B, HKV, K, V] fp32. Inputs as ``liger_fwd`` passes them
    (``_rows``-normalised, pos int64)."""
    B, HKV, T, K = k_pre.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    BK = max(16, triton.next_power_of_2(K))
    dec = torch.empty(B, HKV, NT, K, dtype=torch.float32, device=v.device)
    ht = torch.empty(B, HKV, K, V, dtype=torch.float32, device=v.device)
    if os.environ.get("LIGERFX_LIGER_PHASE1", "scan") == "seq":
        BV = min(SEQ_BLOCKS[_dim(K, V)][0], max(16, triton.next_power_of_2(V)))
        hs = torch.empty(B, HKV, NT, K, V, dtype=state_dtype, device=v.device)
        liger_fwd_kernel_states_seq[(triton.cdiv(V, BV), B * HKV)](
            k_pre=k_pre, gate=gate_src, v=v, pos=pos if pos is not None else dec, h0=h0 if h0 is not None else ht,
            h=hs, dec=dec, ht=ht, **_strides(kp=k_pre, g=gate_src, v=v), T=T, HKV=HKV,
            inv_norm=1.0 / float(gate_normalizer), K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_POS=pos is not None,
            USE_H0=h0 is not None, PREC=dot_precision(v.dtype))
        return hs, dec, ht
    BV = min(LOCAL_BLOCKS[_dim(K, V)][0], max(16, triton.next_power_of_2(V)))
    h = torch.empty(B, HKV, NT, K, V, dtype=torch.float32, device=v.device)
    liger_fwd_kernel_local[(triton.cdiv(V, BV), NT, B * HKV)](
        k_pre=k_pre, gate=gate_src, v=v, pos=pos if pos is not None else dec, hl=h, dec=dec,
        **_strides(kp=k_pre, g=gate_src, v=v), T=T, HKV=HKV, inv_norm=1.0 / float(gate_normalizer), K=K, V=V,
        BT=BT, BK=BK, BV=BV, HAS_POS=pos is not None, PREC=dot_precision(v.dtype))
    # the scan over chunks: one "token" per chunk whose log gate is the chunk decay; in place (L_n -> h_n) for fp32
    hs = h if state_dtype == torch.float32 else torch.empty_like(h, dtype=state_dtype)
    chunk._scan(h, dec, h0, hs, ht, NT, 1, reverse=False)
    return hs, dec, ht


def liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale: float, window: int, mix: float,
              gate_normalizer: float):
    """Forward: ``(o [B,HQ,T,V] in v's dtype, hT [B,HKV,K,V] fp32, lse [B,HQ,T] fp32)``."""
    B, HQ, T, K = q_pre.shape
    HKV, V = k_pre.shape[1], v.shape[-1]
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({HKV})")
    if q_rope.shape != q_pre.shape or k_rope.shape != k_pre.shape or gate_src.shape != k_pre.shape:
        raise ValueError("q_rope / k_rope / gate_src must have the shapes of q_pre / k_pre / k_pre")
    # v's dtype is the compute dtype (window matmuls, GLA operands, o); q_pre, k_pre, gate_src are read as they are
    dt = v.dtype
    q_pre, k_pre, gate_src = _rows(q_pre), _rows(k_pre), _rows(gate_src)
    q_rope, k_rope, v = (_rows(x.to(dt)) for x in (q_rope, k_rope, v))
    pos = None if pos is None else pos.to(torch.int64).contiguous()
    h0 = None if h0 is None else h0.float().contiguous()
    BT, BV, _, _ = _blocks(K, V, T)
    NT = triton.cdiv(T, BT)
    BK = max(16, triton.next_power_of_2(K))
    NV = triton.cdiv(V, BV)
    G = HQ // HKV
    GP = _heads_per_program(G)

    state_dtype = STATE_DTYPES[os.environ.get("LIGERFX_LIGER_STATES", "fp32")]
    h, dec, ht = liger_fwd_states(k_pre, v, gate_src, pos, h0, BT, gate_normalizer, state_dtype)
    o = torch.empty(B, HQ, T, V, dtype=dt, device=v.device)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=v.device)
    strides = _strides(qp=q_pre, kp=k_pre, g=gate_src, v=v, qr=q_rope, kr=k_rope)
    for strong in (False, True):
        liger_fwd_kernel_o[(NV * (G // GP), NT, B * HKV)](
            q_pre=q_pre, k_pre=k_pre, gate=gate_src, v=v, q_rope=q_rope, k_rope=k_rope,
            pos=pos if pos is not None else lse, h=h, dec=dec, o=o, lse=lse, **strides, T=T, HKV=HKV,
            window=int(window), qk_scale=float(scale) * LOG2E, mix=float(mix), inv_norm=1.0 / float(gate_normalizer),
            NW=triton.cdiv(int(window), BT), G=G, GP=GP, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV,
            HAS_POS=pos is not None, GLA_F32=dt != torch.bfloat16, PREC=dot_precision(dt), STRONG=strong)
    return o, ht, lse


def _row_grid(x, BT):
    B, H, T, _ = x.shape
    return (triton.cdiv(T, BT), H, B)


def _prep(x, pos, dtype, fn: int, mask: bool, inv_norm: float = 1.0):
    """fn(x) per row (``ROW_*``), zero on padded rows if ``mask``, contiguous in ``dtype``."""
    x = _rows(x)
    B, H, T, K = x.shape
    y = torch.empty(B, H, T, K, dtype=dtype, device=x.device)
    BT, BK = 32, max(16, triton.next_power_of_2(K))
    liger_bwd_kernel_prep[_row_grid(x, BT)](x=x, pos=pos if pos is not None else x, y=y, s_b=x.stride(0),
                                            s_h=x.stride(1), s_t=x.stride(2), T=T, H=H, inv_norm=inv_norm, K=K,
                                            BT=BT, BK=BK, FN=fn, MASK=mask and pos is not None,
                                            HAS_POS=pos is not None)
    return y


def _finish(x, dy, pos, fn: int, mask: bool, inv_norm: float = 1.0, dz=None):
    """Gradient of ``_prep(x, pos, ., fn, mask, inv_norm)`` given its output's gradient ``dy`` (+ ``dz``), in x's
    dtype."""
    x = _rows(x)
    B, H, T, K = x.shape
    dx = torch.empty(B, H, T, K, dtype=x.dtype, device=x.device)
    BT, BK = 32, max(16, triton.next_power_of_2(K))
    dy = dy.contiguous()
    liger_bwd_kernel_finish[_row_grid(x, BT)](
        x=x, dy=dy, dz=dz.contiguous() if dz is not None else dy, pos=pos if pos is not None else dy, dx=dx,
        s_b=x.stride(0), s_h=x.stride(1), s_t=x.stride(2), T=T, H=H, inv_norm=inv_norm, K=K, BT=BT, BK=BK, FN=fn,
        MASK=mask and pos is not None, HAS_POS=pos is not None, USE_DZ=dz is not None)
    return dx


def gla_bwd(q, k, v, g, h0, do, dhT):
    """``chunk.chunk_gla_bwd`` (same kernels, same contract) with the inter-chunk part of the gate gradient taken
    from the states: every row of chunk n gets ``rowsum(h_end,n * dh_end,n)`` (its end state times that state's
    gradient), where ``chunk_gla_bwd`` adds the chunk totals of ``q dq - k dk`` of every later chunk plus
    ``rowsum(hT * dhT)``. Both are exact; the suffix sum cancels terms of every later chunk against each other, so
    its rounding error grows with the distance to the end of the sequence (and dominates the gate gradient at long
    T), while the state form only depends on the chunk's own end state and its gradient."""
    dtypes = (q.dtype, k.dtype, v.dtype, g.dtype)
    q, k, v, g = chunk._prep(q, k, v, g)
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    G = HQ // HKV
    BT = chunk.chunk_size(T)
    NT = triton.cdiv(T, BT)
    prec = os.environ.get("LIGERFX_GLA_BWD_PREC", "tf32") if q.dtype != torch.float32 else "ieee"
    do = q.new_zeros(B, HQ, T, V, dtype=torch.float32) if do is None else do.contiguous()
    dhT = None if dhT is None else dhT.contiguous()

    h, gc, ht = chunk._states(k, v, g, None if h0 is None else h0.contiguous(), BT, prec, torch.float32)
    # dh[n]: gradient of chunk n's end state
    dh = torch.empty_like(h)
    dh0 = k.new_empty(B, HKV, K, V, dtype=torch.float32)
    BK, BV = chunk._blocks("dlocal", K, V)
    chunk.gla_bwd_kernel_dlocal[(NT * B * HKV, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        q=q, gc=gc, do=do, dl=dh, T=T, G=G, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec)
    chunk._scan(dh, gc, dhT, dh, dh0, T, BT, reverse=True)

    dq = torch.empty(B, HQ, T, K, dtype=dtypes[0], device=q.device)
    dk = torch.empty(B, HKV, T, K, dtype=dtypes[1], device=q.device)
    dgl = k.new_empty(B, HKV, T, K, dtype=torch.float32)
    dbt = k.new_empty(B, HKV, NT, K, dtype=torch.float32)
    for strong in (False, True):
        BK, BV = chunk._blocks("dqk_strong" if strong else "dqk", K, V)
        chunk.gla_bwd_kernel_dqk[(triton.cdiv(K, BK), B * HKV, NT)](
            q=q, k=k, v=v, gc=gc, h=h, do=do, dh=dh, dq=dq, dk=dk, dgl=dgl, dbt=dbt, T=T, G=G, K=K, V=V, BT=BT,
            BC=BC, BK=BK, BV=BV, PREC=prec, STRONG=strong)
    dv = torch.empty(B, HKV, T, V, dtype=dtypes[2], device=q.device)
    for strong in (False, True):
        BK, BV = chunk._blocks("dv_strong" if strong else "dv", K, V)
        chunk.gla_bwd_kernel_dv[(triton.cdiv(V, BV), B * HKV, NT)](
            q=q, k=k, gc=gc, do=do, dh=dh, dv=dv, T=T, G=G, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV, PREC=prec,
            STRONG=strong)

    sfx = dbt  # the chunk totals are not needed: reuse their buffer
    BK = min(64, max(16, triton.next_power_of_2(K)))
    liger_bwd_kernel_gate_carry[(triton.cdiv(K, BK), NT, B * HKV)](
        h=h, ht=ht, dh=dh, sfx=sfx, NT=NT, K=K, V=V, BK=BK, BV=min(64, max(16, triton.next_power_of_2(V))))
    dg = torch.empty(B, HKV, T, K, dtype=dtypes[3], device=q.device)
    BK, _ = chunk._blocks("dg", K, V)
    chunk.gla_bwd_kernel_dg[(triton.cdiv(K, BK), B * HKV, NT)](dgl=dgl, sfx=sfx, dg=dg, T=T, K=K, BT=BT, BK=BK)
    return dq, dk, dv, dg, dh0


def liger_bwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, lse, do, dhT, scale: float, window: int,
              mix: float, gate_normalizer: float):
    """Backward: the math of ``naive.liger_bwd``. Row-wise kernels build the GLA operands (phi_q, phi_k, v in v's
    dtype, g fp32, padded rows zeroed) and apply the feature-map / gate derivatives; the GLA backward kernels and the
    window kernels (forward recomputed for its output, saved ``lse``) do the rest."""
    dt = v.dtype
    B, _, T, _ = q_rope.shape
    pos = None if pos is None else pos.to(torch.int64).contiguous()
    inv_norm = 1.0 / float(gate_normalizer)
    phi_q = _prep(q_pre, pos, dt, ROW_SOFTMAX, mask=False)
    phi_k = _prep(k_pre, pos, dt, ROW_SOFTMAX, mask=True)
    g = _prep(gate_src, pos, torch.float32, ROW_LOGSIGMOID, mask=True, inv_norm=inv_norm)
    vm = _prep(v, pos, dt, ROW_IDENTITY, mask=True) if pos is not None else v
    dphi_q, dphi_k, dv_gla, dg, dh0 = gla_bwd(phi_q, phi_k, vm, g, h0, mix * do.float(), dhT)
    del phi_q, phi_k, g
    p = naive.positions(pos, B, T, v.device)
    qr, kr = q_rope.to(dt), k_rope.to(dt)
    o_swa, _ = swa_window.swa_fwd(qr, kr, v, p, p, float(scale), int(window), 0)
    do_swa = ((1.0 - mix) * do.float()).to(dt)
    dq_rope, dk_rope, dv_swa = swa_window.swa_bwd(qr, kr, v, p, p, o_swa, lse, do_swa, float(scale), int(window), 0)
    dq_pre = _finish(q_pre, dphi_q, pos, ROW_SOFTMAX, mask=False)
    dk_pre = _finish(k_pre, dphi_k, pos, ROW_SOFTMAX, mask=True)
    dgate = _finish(gate_src, dg, pos, ROW_LOGSIGMOID, mask=True, inv_norm=inv_norm)
    dv = _finish(v, dv_gla, pos, ROW_IDENTITY, mask=True, dz=dv_swa)
    return dq_pre, dk_pre, dv, dgate, dq_rope.to(q_rope.dtype), dk_rope.to(k_rope.dtype), dh0
