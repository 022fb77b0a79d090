"""Liger attention forward in one Triton kernel: feature maps, gate, GLA, sliding window and mix, fused.

Same contract as ``naive.liger_fwd`` / ``naive.liger_bwd`` (see there for shapes)::

    liger_fwd(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, h0, scale, window, mix, gate_normalizer)
        -> o [B, HQ, T, V] (v's dtype), hT [B, HKV, K, V] fp32, lse [B, HQ, T] fp32
    liger_bwd(...)  -> naive.liger_bwd with the Triton GLA and window kernels

One program per (V block, batch, KV head, group of GP query heads) walks the sequence in chunks of ``BT`` tokens
with its [K, BV] slice of the GLA state in fp32 registers. Per chunk it reads k_pre, gate_src and v once, derives
``phi_k = softmax(k_pre)`` and ``g = logsigmoid(gate_src) / gate_normalizer`` in fp32, then for each of its query
heads reads q_pre and q_rope once and computes::

    o_gla = (phi_q exp(c)) h + A v,   A_ij = sum_d phi_q,id phi_k,jd exp(c_id - c_jd) (j <= i in the chunk)
    o_swa = online softmax over the keys (k_rope, v) of this chunk and the ceil(window / BT) chunks before it;
            positions decide visibility (0 <= pos_t - pos_j <= window, pos >= 0); lse stored for the backward
    o     = mix * o_gla + (1 - mix) * o_swa                      written once, in v's dtype

and finally ``h <- diag(exp(c_last)) h + (phi_k exp(c_last - c))^T v``. ``c`` is the in-chunk cumulative log gate;
padded tokens (pos < 0) have phi_k = v = g = 0. Dots take v's dtype (bf16 tensor cores for 16-bit inputs, fp32 ieee
for fp32), accumulate in fp32.

Intra-chunk scores take one dot through the chunk start when the chunk's total log decay stays above
``-FAST_DECAY`` in every key dim (every realistic Liger gate). Other chunks take the sub-chunk path of
``gla/chunk.py`` (every exponent <= 0, any gate strength), which reads phi_k and c back from a per-program scratch
buffer that only such chunks write.

Parallelism: the state is sequential in time, so the grid is only (V blocks) x (query-head groups) x B x HKV.
Splitting V keeps the state in registers for large head dims (each V block recomputes the feature maps, scores and
window softmax; the first one stores ``lse``). GP < HQ/HKV gives small batches more programs, each recomputing the
shared state (``_heads_per_program``); GP = HQ/HKV is the one-state-per-KV-head layout.

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
from ..gla.chunk import FAST_DECAY, _gla_intra_A_strong
from ..swa import window as swa_window
from ..utils import autotune, dot_precision, warps_stages
from . import naive

LOG2E = 1.4426950408889634
BC = chunk.BC

# head dim -> (BT, BV cap, num_warps, num_stages): chunk length, V block per program and launch config (the launch
# config unless LIGERFX_AUTOTUNE=1). Picked offline (triton 3.9, sm_90a, bf16, ptxas -v) as the largest tiles with
# at most 48 bytes of register spills for 1 to 4 query heads per program (one program takes all 255 registers of
# 8 warps: one program per SM). Tuning override, e.g. LIGERFX_LIGER_BLOCKS="128=16,128,8,1;256=16,64,8,1".
BLOCKS = {64: (32, 64, 8, 1), 128: (16, 64, 8, 1), 256: (16, 32, 8, 1)}
for _item in filter(None, os.environ.get("LIGERFX_LIGER_BLOCKS", "").split(";")):
    _name, _vals = _item.split("=")
    BLOCKS[int(_name)] = tuple(int(x) for x in _vals.split(","))


def _blocks(K: int, V: int, T: int):
    BT, BV, warps, stages = BLOCKS[min(256, max(64, triton.next_power_of_2(max(K, V))))]
    return min(BT, max(BC, triton.next_power_of_2(T))), min(BV, max(16, triton.next_power_of_2(V))), warps, stages


def _heads_per_program(G: int, programs_per_group: int, device: torch.device) -> int:
    """Query heads per program: the largest divisor GP of G that still gives every SM a program
    (``G / GP * programs_per_group >= SMs``), else 1. Programs that share a KV head each recompute its state: more
    parallelism for small batches, at the price of re-reading (mostly from L2) and re-deriving the key side.
    ``LIGERFX_LIGER_GP=n`` caps GP at n instead."""
    divisors = [d for d in range(G, 0, -1) if G % d == 0]
    env = os.environ.get("LIGERFX_LIGER_GP")
    if env:
        return next(d for d in divisors if d <= int(env))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return next((d for d in divisors if G // d * programs_per_group >= sms), 1)


def _default(kw):
    _, _, warps, stages = _blocks(kw["K"], kw["V"], 1 << 20)
    return triton.Config({}, num_warps=warps, num_stages=stages)


@triton.jit
def _softmax_rows(b_x, m_k):
    """Softmax of every row of b_x over its valid columns (fp32)."""
    b_x = tl.where(m_k[None, :], b_x.to(tl.float32), float("-inf"))
    b_e = tl.exp(b_x - tl.max(b_x, 1)[:, None])
    return b_e / tl.sum(b_e, 1)[:, None]


@triton.jit
def _positions(p_pos, o_t, T, HAS_POS: tl.constexpr):
    """Positions of rows o_t (-1 past T or for padding)."""
    if HAS_POS:
        b_p = tl.load(p_pos + o_t, mask=o_t < T, other=-1).to(tl.int32)
    else:
        b_p = tl.where(o_t < T, o_t, -1)
    return b_p


@autotune(configs=warps_stages(warps=(4, 8), stages=(1, 2)), key=["K", "V", "BT", "BK", "BV", "GP"],
          default=_default)
@triton.jit(do_not_specialize=["T", "window"])
def liger_fwd_kernel(q_pre, k_pre, gate, v, q_rope, k_rope, pos, h0, o, ht, lse, sk, sc,
                     s_qp_b, s_qp_h, s_qp_t, s_kp_b, s_kp_h, s_kp_t, s_g_b, s_g_h, s_g_t, s_v_b, s_v_h, s_v_t,
                     s_qr_b, s_qr_h, s_qr_t, s_kr_b, s_kr_h, s_kr_t,
                     T, HKV, NW, window, qk_scale, mix, inv_norm, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_POS: tl.constexpr, USE_H0: tl.constexpr, PREC: tl.constexpr):
    i_v, i_gp, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = tl.cast(i_bh, tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    # dot operand dtype: v's (bf16 tensor cores for 16-bit inputs; fp32 ieee for fp32)
    DT = v.dtype.element_ty
    NT = tl.cdiv(T, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kp = k_pre + i_b * s_kp_b + i_h * s_kp_h
    p_g = gate + i_b * s_g_b + i_h * s_g_h
    p_v = v + i_b * s_v_b + i_h * s_v_h
    p_kr = k_rope + i_b * s_kr_b + i_h * s_kr_h
    p_pos = pos + i_b * T
    # this program's scratch for phi_k and c of strong-gate chunks, [BT, BK] each
    i_p = (i_bh * tl.num_programs(1) + i_gp) * tl.num_programs(0) + i_v
    p_sk = sk + i_p * BT * BK
    p_sc = sc + i_p * BT * BK

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.).to(tl.float32)
    for i_t in range(NT):
        o_t = i_t * BT + o_i
        m_t = o_t < T
        m_tk = m_t[:, None] & m_k[None, :]
        b_pt = _positions(p_pos, o_t, T, HAS_POS)
        m_val = b_pt >= 0

        # key side, shared by the query heads: phi_k, log gate (logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|))),
        # in-chunk cumulative gate c; padded rows write nothing (phi_k = v = 0) and decay nothing (g = 0)
        b_k = _softmax_rows(tl.load(p_kp + (o_t * s_kp_t)[:, None] + o_k[None, :], mask=m_tk, other=0.), m_k)
        b_k = tl.where(m_val[:, None], b_k, 0.)
        b_g = tl.load(p_g + (o_t * s_g_t)[:, None] + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_g = tl.where(m_val[:, None] & m_k[None, :],
                       (tl.minimum(b_g, 0.) - tl.log(1. + tl.exp(-tl.abs(b_g)))) * inv_norm, 0.)
        b_c = tl.cumsum(b_g, 0)
        b_cl = tl.sum(b_g, 0)
        fast = tl.min(b_cl, 0) > -FAST_DECAY
        if not fast:
            tl.debug_barrier()
            tl.store(p_sk + o_i[:, None] * BK + o_k[None, :], b_k)
            tl.store(p_sc + o_i[:, None] * BK + o_k[None, :], b_c)
            tl.debug_barrier()
        # the tiles live over the heads; exp(-c) <= exp(FAST_DECAY) on the fast path
        b_kg = (b_k * tl.exp(tl.minimum(-b_c, FAST_DECAY))).to(DT)
        b_ec = tl.exp(b_c).to(DT)
        b_hd = b_h.to(DT)
        b_v = tl.load(p_v + (o_t * s_v_t)[:, None] + o_v[None, :], mask=m_val[:, None] & m_v[None, :], other=0.)

        for i_g in range(GP):
            i_hq = i_h * G + i_gp * GP + i_g
            # per-head base pointers first: the [BT, *] offsets are then computed in the loop, not kept live
            p_q = q_pre + i_b * s_qp_b + i_hq * s_qp_h
            p_qr = q_rope + i_b * s_qr_b + i_hq * s_qr_h
            p_o = o + (i_b * HKV * G + i_hq) * T * V
            # recurrent branch: inter-chunk (state) + intra-chunk
            b_q = _softmax_rows(tl.load(p_q + (o_t * s_qp_t)[:, None] + o_k[None, :], mask=m_tk, other=0.), m_k)
            b_qg = (b_q * b_ec).to(DT)
            b_o = tl.dot(b_qg, b_hd, input_precision=PREC)
            if fast:
                b_A = tl.where(o_i[:, None] >= o_i[None, :], tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC), 0.)
            else:
                b_A = _gla_intra_A_strong(tl.zeros([BT, BT], dtype=tl.float32), b_q,
                                          tl.load(p_sk + o_i[:, None] * BK + o_k[None, :]),
                                          tl.load(p_sc + o_i[:, None] * BK + o_k[None, :]), p_sk, p_sc, 0, BT, o_k,
                                          m_k, K=BK, BT=BT, BC=BC, PREC=PREC)
            b_o += tl.dot(b_A.to(DT), b_v, input_precision=PREC)

            # window branch: online softmax over this chunk and the NW chunks before it (log2 units)
            b_qr = tl.load(p_qr + (o_t * s_qr_t)[:, None] + o_k[None, :], mask=m_tk, other=0.)
            b_acc = tl.zeros([BT, BV], dtype=tl.float32)
            b_l = tl.zeros([BT], dtype=tl.float32)
            b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
            for i_n in range(tl.maximum(i_t - NW, 0), i_t + 1):
                o_n = i_n * BT + o_i
                m_n = o_n < T
                b_pn = _positions(p_pos, o_n, T, HAS_POS)
                b_kr = tl.load(p_kr + (o_n * s_kr_t)[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                               other=0.)
                b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=PREC) * qk_scale
                b_d = b_pt[:, None] - b_pn[None, :]
                m_vis = m_val[:, None] & (b_pn >= 0)[None, :] & (b_d >= 0) & (b_d <= window)
                b_s = tl.where(m_vis, b_s, float("-inf"))
                b_mn = tl.maximum(b_m, tl.max(b_s, 1))
                # rows that have seen no key yet keep m = -inf; shift them by 0 so that exp2 gives 0, not NaN
                b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
                b_p = tl.exp2(b_s - b_ms[:, None])
                b_alpha = tl.exp2(b_m - b_ms)
                b_l = b_l * b_alpha + tl.sum(b_p, 1)
                b_vn = tl.load(p_v + (o_n * s_v_t)[:, None] + o_v[None, :], mask=m_n[:, None] & m_v[None, :],
                               other=0.)
                b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(DT), b_vn, input_precision=PREC)
                b_m = b_mn
            m_l = b_l > 0
            b_os = tl.where(m_l[:, None], b_acc / tl.where(m_l, b_l, 1.)[:, None], 0.)

            b_o = mix * b_o + (1. - mix) * b_os
            tl.store(p_o + (o_t * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
            if i_v == 0:
                b_lse = tl.where(m_l, (b_m + tl.log2(tl.where(m_l, b_l, 1.))) / 1.4426950408889634, float("-inf"))
                tl.store(lse + (i_b * HKV * G + i_hq) * T + o_t, b_lse, mask=m_t)

        # h <- diag(exp(c_last)) h + (phi_k exp(c_last - c))^T v
        if fast:
            b_kd = (b_kg.to(tl.float32) * tl.exp(b_cl)[None, :]).to(DT)
        else:
            b_kd = (tl.load(p_sk + o_i[:, None] * BK + o_k[None, :]) * tl.exp(
                tl.minimum(b_cl[None, :] - tl.load(p_sc + o_i[:, None] * BK + o_k[None, :]), 0.))).to(DT)
        b_h = b_h * tl.exp(b_cl)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    if i_gp == 0:
        tl.store(ht + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


# ----------------------------------------------------------------------------------------------------- backward
# The backward pass runs the GLA and window backward kernels on materialised branch inputs; these two row-wise
# kernels replace the PyTorch passes around them (feature maps and gate in, their derivatives out).
ROW_IDENTITY, ROW_SOFTMAX, ROW_LOGSIGMOID = 0, 1, 2


@triton.jit(do_not_specialize=["T"])
def liger_bwd_kernel_prep(x, pos, y, s_b, s_h, s_t, T, H, inv_norm, K: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, FN: tl.constexpr, MASK: tl.constexpr, HAS_POS: tl.constexpr):
    """y = fn(x) per row (identity, softmax, logsigmoid * inv_norm), zero on padded rows if MASK; y contiguous."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.cast(i_b, tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = (o_t < T)[:, None] & m_k[None, :]
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
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.cast(i_b, tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = (o_t < T)[:, None] & m_k[None, :]
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
            # logsigmoid: sigmoid(-x) dy
            b_dx = b_dy * inv_norm / (1. + tl.exp(b_x.to(tl.float32)))
    if USE_DZ:
        b_dx += tl.load(dz + o_r, mask=m_tk, other=0.).to(tl.float32)
    tl.store(dx + o_r, b_dx.to(dx.dtype.element_ty), mask=m_tk)


# ------------------------------------------------------------------------------------------------ host wrappers
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride along its last dim and in-row offsets (t * stride_t) that fit int32; other strides are
    passed to the kernel as they are."""
    ok = x.stride(-1) == 1 and x.shape[2] * x.stride(2) < 2 ** 31
    return x if ok else x.contiguous()


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
    h0 = None if h0 is None else h0.contiguous()
    BT, BV, _, _ = _blocks(K, V, T)
    BK = max(16, triton.next_power_of_2(K))
    NV = triton.cdiv(V, BV)
    G = HQ // HKV
    GP = _heads_per_program(G, NV * B * HKV, v.device)

    o = torch.empty(B, HQ, T, V, dtype=dt, device=v.device)
    ht = torch.empty(B, HKV, K, V, dtype=torch.float32, device=v.device)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=v.device)
    # written only for chunks with strong gates
    sk = torch.empty(B * HKV * (G // GP) * NV, BT, BK, dtype=torch.float32, device=v.device)
    sc = torch.empty_like(sk)
    strides = {}
    for name, x in (("qp", q_pre), ("kp", k_pre), ("g", gate_src), ("v", v), ("qr", q_rope), ("kr", k_rope)):
        strides.update({f"s_{name}_b": x.stride(0), f"s_{name}_h": x.stride(1), f"s_{name}_t": x.stride(2)})
    liger_fwd_kernel[(NV, G // GP, B * HKV)](
        q_pre=q_pre, k_pre=k_pre, gate=gate_src, v=v, q_rope=q_rope, k_rope=k_rope,
        pos=pos if pos is not None else o, h0=h0 if h0 is not None else ht, o=o, ht=ht, lse=lse, sk=sk, sc=sc,
        **strides, T=T, HKV=HKV, NW=triton.cdiv(int(window), BT), window=int(window),
        qk_scale=float(scale) * LOG2E, mix=float(mix), inv_norm=1.0 / float(gate_normalizer), G=G, GP=GP,
        K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV, HAS_POS=pos is not None, USE_H0=h0 is not None,
        PREC=dot_precision(dt))
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
    dphi_q, dphi_k, dv_gla, dg, dh0 = chunk.chunk_gla_bwd(phi_q, phi_k, vm, g, h0, mix * do.float(), dhT)
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
