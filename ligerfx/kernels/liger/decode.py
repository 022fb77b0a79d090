"""Liger decode step in Triton: one program per (sequence, KV head) runs the whole layer's step, for a batch.

Same contract as ``naive.liger_decode`` (shapes and math there): feature maps and gate, the fp32 state update in
place, ``o_gla`` for the ``G`` query heads of the group, the window softmax over the sink slots, the ring and the
new token, the mix, and the new token's writes into the ring and sink slots::

    liger_decode(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos, sink_k, sink_v,
                 sink_pos, scale, window, mix, gate_normalizer) -> o [B, HQ, 1, V]

``liger_decode_kernel`` (grid ``B * HKV``) first scores the ``G`` queries against every window key (sink slots,
ring, the token itself; ``[G, W + S + 1]`` fp32 in registers, normalised once), then walks the value dim in blocks
of ``BV``: load the state tile ``[K, BV]``, update it and store it back (same tile, same threads), ``o_gla = phi_q
S``, ``o_swa = p @ [sink_v; ring_v; v]`` on the same block, ``o`` written once. The new key and value go into the
ring / sink slots last, after a barrier: ring slot ``pos % W`` still holds the oldest token of the window, which
every warp of the program reads first. No ``tl.dot`` (``G`` is a handful of rows): products are broadcast and summed
in fp32, so the kernel is exact in fp32 and runs in the interpreter for every dtype.

``COMP`` (``win_kp`` / ``win_gs`` given: ``variant="complementary"``): the state has ``V + 1`` columns and holds
only the tokens that left the ring. Before the value loop the program sums the gates of the occupied ring slots
and the token (``[W, K]`` gate inputs: the one extra read, ``sWK`` bytes), reads the normaliser column (the
denominator of each query head) and pushes the ring's oldest token (slot ``pos % W``: its pre-RoPE key and gate
input) into it; in the value loop it reads the numerator from the state tile decayed by those gates, pushes the
oldest token's value, and divides ``o_swa + numerator`` (the window's softmax output, mass 1) by ``1 +
denominator``; the token's pre-RoPE key and gate input go into its ring slot after the barrier, with the rest.

``win_pos`` / ``sink_pos`` are per sequence and read by all ``HKV`` programs of a sequence, so no program may write
them: ``liger_decode_kernel_pos`` (grid ``B``) writes them in a second launch.

HBM bytes per (sequence, KV head), ``s`` the element size of the ring: the fp32 state read and written ``8KV``, the
window read ``s(W + S)(K + V)``, the token's inputs ``s(3K + V) + 2sGK`` and ``o`` ``sGV``. At K = V = 64, W = 64,
bf16, G = 4: 32 KB state + 16 KB window + 1.5 KB; the state dominates from K = V = 64 up.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreting


@triton.jit
def _select_row(b_x, o_g, i_g):
    """Row ``i_g`` of b_x [BG, N] as [N] (no dynamic register indexing)."""
    return tl.sum(tl.where((o_g == i_g)[:, None], b_x, 0.), 0)


@triton.jit
def _window_scores(b_q, p_k, p_pos, b_pos, o_g, o_k, m_k, scale, window, lo, S: tl.constexpr, N: tl.constexpr,
                   BN: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, K: tl.constexpr):
    """[BG, BN] scaled scores of the queries b_q [BG, BK] against N cached keys (p_k [N, K], positions p_pos [N]);
    -inf where a key is not visible: position below ``lo``, unset (< 0), after the query, or further back than
    ``window`` unless a sink (< S)."""
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    b_kp = tl.load(p_pos + o_n, mask=m_n, other=-1)
    m_vis = (b_kp >= 0) & (b_kp >= lo) & (b_kp <= b_pos) & ((b_pos - b_kp <= window) | (b_kp < S))
    b_k = tl.load(p_k + (o_n * K)[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
    b_k = b_k.to(tl.float32)  # [BN, BK]
    b_s = tl.zeros([BG, BN], dtype=tl.float32)
    for i_g in tl.static_range(G):
        b_sg = tl.sum(b_k * _select_row(b_q, o_g, i_g)[None, :], 1)
        b_s = tl.where((o_g == i_g)[:, None], b_sg[None, :], b_s)
    return tl.where(m_vis[None, :], b_s * scale, float("-inf"))


@triton.jit
def _window_values(b_p, p_v, o_v, m_v, o_g, N: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                   BV: tl.constexpr, V: tl.constexpr):
    """[BG, BV] = b_p [BG, BN] @ the value block o_v of N cached values (p_v [N, V]), fp32."""
    o_n = tl.arange(0, BN)
    b_v = tl.load(p_v + (o_n * V)[:, None] + o_v[None, :], mask=(o_n < N)[:, None] & m_v[None, :], other=0.)
    b_v = b_v.to(tl.float32)  # [BN, BV]
    b_o = tl.zeros([BG, BV], dtype=tl.float32)
    for i_g in tl.static_range(G):
        b_og = tl.sum(_select_row(b_p, o_g, i_g)[:, None] * b_v, 0)
        b_o = tl.where((o_g == i_g)[:, None], b_og[None, :], b_o)
    return b_o


@triton.jit
def _store_token(b_x, win, sink, i_bh, b_pos, b_pos_x, o_x, m_x, W: tl.constexpr, S: tl.constexpr,
                 D: tl.constexpr):
    """The token's key or value block b_x (columns o_x of D) into ring slot ``pos % W`` and, while ``pos < S``,
    sink slot ``pos``; m_x masks the columns and padding rows (b_pos_x: the position broadcast to the block)."""
    if W > 0:
        tl.store(win + (i_bh * W + tl.maximum(b_pos, 0) % W) * D + o_x, b_x.to(win.dtype.element_ty), mask=m_x)
    if S > 0:
        p = sink + (i_bh * S + tl.minimum(tl.maximum(b_pos, 0), S - 1)) * D + o_x
        tl.store(p, b_x.to(sink.dtype.element_ty), mask=m_x & (b_pos_x < S))


@triton.jit
def liger_decode_kernel(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos, sink_k,
                        sink_v, sink_pos, o, q_sink, win_kp, win_gs, s_qp_b, s_qp_h, s_kp_b, s_kp_h, s_v_b, s_v_h,
                        s_g_b, s_g_h, s_qr_b, s_qr_h, s_kr_b, s_kr_h, s_qs_b, s_qs_h, scale, window, mix, inv_norm,
                        HKV, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                        BG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr,
                        RECURRENT: tl.constexpr, WINDOWED: tl.constexpr, SINKQ: tl.constexpr, COMP: tl.constexpr):
    i_bh = tl.cast(tl.program_id(0), tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_g, o_k = tl.arange(0, BG), tl.arange(0, BK)
    m_g, m_k = o_g < G, o_k < K
    m_gk = m_g[:, None] & m_k[None, :]
    i_hq = i_h * G + o_g  # [BG] the query heads of the group

    # the token's position, broadcast to the K, G and V index blocks (validity masks of block shape)
    b_pos = tl.load(pos + i_b)
    b_pos_k = tl.zeros([BK], dtype=tl.int64) + b_pos
    b_pos_v = tl.zeros([BV], dtype=tl.int64) + b_pos
    m_val_k, m_val_v = b_pos_k >= 0, b_pos_v >= 0
    m_val_g = (tl.zeros([BG], dtype=tl.int64) + b_pos) >= 0

    if RECURRENT:
        b_x = tl.load(q_pre + i_b * s_qp_b + i_hq[:, None] * s_qp_h + o_k[None, :], mask=m_gk, other=0.)
        b_x = tl.where(m_k[None, :], b_x.to(tl.float32), float("-inf"))
        b_e = tl.exp(b_x - tl.max(b_x, 1)[:, None])
        b_phq = b_e / tl.sum(b_e, 1)[:, None]  # [BG, BK]
        b_x = tl.load(k_pre + i_b * s_kp_b + i_h * s_kp_h + o_k, mask=m_k, other=0.)
        b_x = tl.where(m_k, b_x.to(tl.float32), float("-inf"))
        b_e = tl.exp(b_x - tl.max(b_x, 0))
        # a padded token writes nothing (phi_k = 0) and decays nothing (g = 0)
        b_phk = tl.where(m_val_k & m_k, b_e / tl.sum(b_e, 0), 0.)  # [BK]
        b_x = tl.load(gate_src + i_b * s_g_b + i_h * s_g_h + o_k, mask=m_k, other=0.).to(tl.float32)
        # logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|))
        b_ls = (tl.minimum(b_x, 0.) - tl.log(1. + tl.exp(-tl.abs(b_x)))) * inv_norm
        b_a = tl.exp(tl.where(m_val_k, b_ls, 0.))  # [BK] decay
        if COMP:
            # complementary: the state holds the tokens that left the ring (V + 1 columns, the last the
            # normaliser). Read: the state decayed by the gates of every ring token and the new one. Push: the
            # ring's oldest token (slot pos % W) leaves it for the state, unless the slot is empty or the row is
            # padding; a sink token (position < S) only decays it.
            o_w = tl.arange(0, BW)
            b_wp = tl.load(win_pos + i_b * W + o_w, mask=o_w < W, other=-1)  # [BW]
            b_x = tl.load(win_gs + (i_bh * W + o_w[:, None]) * K + o_k[None, :],
                          mask=(o_w < W)[:, None] & m_k[None, :], other=0.).to(tl.float32)  # [BW, BK]
            b_lr = (tl.minimum(b_x, 0.) - tl.log(1. + tl.exp(-tl.abs(b_x)))) * inv_norm
            b_dec = tl.exp(tl.sum(tl.where((b_wp >= 0)[:, None], b_lr, 0.), 0) + tl.where(m_val_k, b_ls, 0.))
            i_slot = tl.maximum(b_pos, 0) % W
            b_op = tl.load(win_pos + i_b * W + i_slot)
            b_push = (b_pos >= 0) & (b_op >= 0)
            b_x = tl.load(win_gs + (i_bh * W + i_slot) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            b_ls = (tl.minimum(b_x, 0.) - tl.log(1. + tl.exp(-tl.abs(b_x)))) * inv_norm
            b_a = tl.exp(tl.where(m_k & b_push, b_ls, 0.))  # [BK] decay of the push
            b_x = tl.load(win_kp + (i_bh * W + i_slot) * K + o_k, mask=m_k, other=0.)
            b_x = tl.where(m_k, b_x.to(tl.float32), float("-inf"))
            b_e = tl.exp(b_x - tl.max(b_x, 0))
            b_phk = tl.where(m_k & b_push & (b_op >= S), b_e / tl.sum(b_e, 0), 0.)  # [BK] phi of the leaving key
            b_phq = tl.where(m_val_g[:, None], b_phq, 0.)  # a padded row reads nothing (its output is 0)
            # the normaliser column: read (the denominator, per query head), then push a 1
            p_n = state + (i_bh * K + o_k) * (V + 1) + V
            b_sn = tl.load(p_n, mask=m_k, other=0.)
            b_den = tl.sum(b_phq * (b_sn * b_dec)[None, :], 1)  # [BG]
            tl.store(p_n, b_sn * b_a + b_phk, mask=m_k)

    if WINDOWED:
        b_q = tl.load(q_rope + i_b * s_qr_b + i_hq[:, None] * s_qr_h + o_k[None, :], mask=m_gk, other=0.)
        b_q = b_q.to(tl.float32)  # [BG, BK]
        b_kn = tl.load(k_rope + i_b * s_kr_b + i_h * s_kr_h + o_k, mask=m_k, other=0.)
        # the token enters the window as the buffers will hold it at the next steps
        if S > 0:
            b_kn = b_kn.to(sink_k.dtype.element_ty)
        elif W > 0:
            b_kn = b_kn.to(win_k.dtype.element_ty)
        b_sn = tl.where(m_val_g, tl.sum(b_q * b_kn.to(tl.float32)[None, :], 1) * scale, float("-inf"))  # [BG]
        b_m = b_sn
        if W > 0:
            # ring slots holding a sink token (position < S) are skipped: that token is in a sink slot
            b_sw = _window_scores(b_q, win_k + i_bh * W * K, win_pos + i_b * W, b_pos, o_g, o_k, m_k, scale, window,
                                  S, S, W, BW, G, BG, K)  # [BG, BW]
            b_m = tl.maximum(b_m, tl.max(b_sw, 1))
        if S > 0:
            b_qs = b_q  # the sink slots' query: q_rope, or the caller's q_sink (sinks scored from a fixed position)
            if SINKQ:
                b_qs = tl.load(q_sink + i_b * s_qs_b + i_hq[:, None] * s_qs_h + o_k[None, :], mask=m_gk,
                               other=0.).to(tl.float32)
            b_ss = _window_scores(b_qs, sink_k + i_bh * S * K, sink_pos + i_b * S, b_pos, o_g, o_k, m_k, scale,
                                  window, 0, S, S, BS, G, BG, K)  # [BG, BS]
            b_m = tl.maximum(b_m, tl.max(b_ss, 1))
        # a padded row sees no key: every score -inf, p = 0, o_swa = 0
        b_m = tl.where(b_m > float("-inf"), b_m, 0.)
        b_pn = tl.exp(b_sn - b_m)
        b_l = b_pn
        if W > 0:
            b_pw = tl.exp(b_sw - b_m[:, None])
            b_l += tl.sum(b_pw, 1)
        if S > 0:
            b_ps = tl.exp(b_ss - b_m[:, None])
            b_l += tl.sum(b_ps, 1)
        b_inv = tl.where(b_l > 0, 1. / tl.where(b_l > 0, b_l, 1.), 0.)
        b_pn = b_pn * b_inv
        if W > 0:
            b_pw = b_pw * b_inv[:, None]
        if S > 0:
            b_ps = b_ps * b_inv[:, None]

    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_b * s_v_b + i_h * s_v_h + o_v, mask=m_v, other=0.)  # [BV]
        b_o = tl.zeros([BG, BV], dtype=tl.float32)
        if COMP:
            p_s = state + (i_bh * K + o_k[:, None]) * (V + 1) + o_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            b_s = tl.load(p_s, mask=m_kv, other=0.)  # [BK, BV]
            b_r = b_s * b_dec[:, None]
            for i_g in tl.static_range(G):  # the numerator: phi_q . decayed state
                b_og = tl.sum(_select_row(b_phq, o_g, i_g)[:, None] * b_r, 0)
                b_o = tl.where((o_g == i_g)[:, None], b_og[None, :], b_o)
            b_vo = tl.load(win_v + (i_bh * W + i_slot) * V + o_v, mask=m_v, other=0.).to(tl.float32)
            tl.store(p_s, b_s * b_a[:, None] + b_phk[:, None] * b_vo[None, :], mask=m_kv)
        elif RECURRENT:
            p_s = state + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            b_s = tl.load(p_s, mask=m_kv, other=0.)
            b_s = b_s * b_a[:, None] + b_phk[:, None] * b_v.to(tl.float32)[None, :]  # [BK, BV]
            tl.store(p_s, b_s, mask=m_kv & m_val_k[:, None])
            for i_g in tl.static_range(G):
                b_og = tl.sum(_select_row(b_phq, o_g, i_g)[:, None] * b_s, 0)
                b_o = tl.where((o_g == i_g)[:, None], mix * b_og[None, :], b_o)
        if WINDOWED:
            b_vn = b_v
            if S > 0:
                b_vn = b_vn.to(sink_v.dtype.element_ty)
            elif W > 0:
                b_vn = b_vn.to(win_v.dtype.element_ty)
            b_w = b_pn[:, None] * b_vn.to(tl.float32)[None, :]  # [BG, BV]
            if W > 0:
                b_w += _window_values(b_pw, win_v + i_bh * W * V, o_v, m_v, o_g, W, BW, G, BG, BV, V)
            if S > 0:
                b_w += _window_values(b_ps, sink_v + i_bh * S * V, o_v, m_v, o_g, S, BS, G, BG, BV, V)
            if COMP:  # one normaliser: the window's mass is 1, the state's is its last column
                b_o = (b_w + b_o) / (1. + b_den)[:, None]
            else:
                b_o += (1. - mix) * b_w
        tl.store(o + ((i_bh * G + o_g) * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_g[:, None] & m_v[None, :])

    # the token's key and value into its slots, once every warp has read the old ones
    tl.debug_barrier()
    b_kr = tl.load(k_rope + i_b * s_kr_b + i_h * s_kr_h + o_k, mask=m_k, other=0.)
    _store_token(b_kr, win_k, sink_k, i_bh, b_pos, b_pos_k, o_k, m_k & m_val_k, W, S, K)
    if COMP:  # the ring's pre-RoPE key and gate input, for the push when the token leaves the ring
        b_x = tl.load(k_pre + i_b * s_kp_b + i_h * s_kp_h + o_k, mask=m_k, other=0.)
        _store_token(b_x, win_kp, win_kp, i_bh, b_pos, b_pos_k, o_k, m_k & m_val_k, W, 0, K)
        b_x = tl.load(gate_src + i_b * s_g_b + i_h * s_g_h + o_k, mask=m_k, other=0.)
        _store_token(b_x, win_gs, win_gs, i_bh, b_pos, b_pos_k, o_k, m_k & m_val_k, W, 0, K)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_b * s_v_b + i_h * s_v_h + o_v, mask=m_v, other=0.)
        _store_token(b_v, win_v, sink_v, i_bh, b_pos, b_pos_v, o_v, m_v & m_val_v, W, S, V)


@triton.jit
def liger_decode_kernel_pos(pos, win_pos, sink_pos, W: tl.constexpr, S: tl.constexpr):
    """The token's position into its ring slot (``pos % W``) and sink slot (``pos < S``); padding writes nothing."""
    i_b = tl.cast(tl.program_id(0), tl.int64)
    b_pos = tl.load(pos + i_b)
    b_valid = b_pos >= 0
    if W > 0:
        tl.store(win_pos + i_b * W + tl.maximum(b_pos, 0) % W, b_pos, mask=b_valid)
    if S > 0:
        tl.store(sink_pos + i_b * S + tl.minimum(tl.maximum(b_pos, 0), S - 1), b_pos, mask=b_valid & (b_pos < S))


def _strides(x: torch.Tensor):
    """(x, stride over the batch, stride over the heads) of a [B, H, 1, D] input, with a unit stride over D."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x, x.stride(0), x.stride(1)


def liger_decode(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos, sink_k, sink_v,
                 sink_pos, scale: float, window: int, mix: float, gate_normalizer: float, q_sink=None, win_kp=None,
                 win_gs=None):
    """One decode step, in place on the buffers (``naive.liger_decode``'s contract). The buffers must be
    contiguous (they are written in place); the inputs may be strided views with a unit stride over the head dim."""
    B, HQ, T, K = q_pre.shape
    HKV, V = k_rope.shape[1], v.shape[-1]
    if T != 1:
        raise ValueError(f"liger_decode: one token per sequence, got T={T}")
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({HKV})")
    for name, t in (("state", state), ("win_k", win_k), ("win_v", win_v), ("win_pos", win_pos), ("sink_k", sink_k),
                    ("sink_v", sink_v), ("sink_pos", sink_pos), ("win_kp", win_kp), ("win_gs", win_gs)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"liger_decode: {name} must be contiguous (it is updated in place)")
    G = HQ // HKV
    W = 0 if win_k is None else win_k.shape[2]
    S = 0 if sink_k is None else sink_k.shape[2]
    comp = win_kp is not None
    if comp and (state is None or W == 0 or win_gs is None or state.shape[-1] != V + 1):
        raise ValueError("liger_decode: the complementary step needs win_kp, win_gs, a ring and a state of V + 1 "
                         f"columns (got W={W}, state {None if state is None else tuple(state.shape)}, V={V})")
    (q_pre, s_qp_b, s_qp_h), (k_pre, s_kp_b, s_kp_h), (v, s_v_b, s_v_h), (gate_src, s_g_b, s_g_h), \
        (q_rope, s_qr_b, s_qr_h), (k_rope, s_kr_b, s_kr_h) = map(_strides, (q_pre, k_pre, v, gate_src, q_rope, k_rope))
    q_sink, s_qs_b, s_qs_h = _strides(q_sink) if q_sink is not None else (q_rope, s_qr_b, s_qr_h)
    pos = pos.reshape(B).contiguous()
    o = v.new_empty(B, HQ, 1, V)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 32 if BK > 128 else 64)
    BW, BS = max(1, triton.next_power_of_2(W)), max(1, triton.next_power_of_2(S))
    none = o  # any pointer for the buffers a variant does not have (never dereferenced)
    # a fixed launch config, never autotuned: a tuner re-runs the launch, and the kernel updates its buffers in place.
    # 8 warps at K = 256 so the [W, K] fp32 ring-key tile stays at 64 registers a thread (not yet timed on a card)
    launch = {} if interpreting() else dict(num_warps=8 if BK * max(BW, 16) > 8192 else 4, num_stages=1)
    liger_decode_kernel[(B * HKV,)](
        q_pre=q_pre, k_pre=k_pre, v=v, gate_src=gate_src, q_rope=q_rope, k_rope=k_rope, pos=pos,
        state=none if state is None else state, win_k=none if W == 0 else win_k, win_v=none if W == 0 else win_v,
        win_pos=pos if W == 0 else win_pos, sink_k=none if S == 0 else sink_k, sink_v=none if S == 0 else sink_v,
        sink_pos=pos if S == 0 else sink_pos, o=o, q_sink=q_sink, win_kp=win_kp if comp else none,
        win_gs=win_gs if comp else none, s_qp_b=s_qp_b, s_qp_h=s_qp_h, s_kp_b=s_kp_b,
        s_kp_h=s_kp_h, s_v_b=s_v_b, s_v_h=s_v_h, s_g_b=s_g_b, s_g_h=s_g_h, s_qr_b=s_qr_b, s_qr_h=s_qr_h,
        s_kr_b=s_kr_b, s_kr_h=s_kr_h, s_qs_b=s_qs_b, s_qs_h=s_qs_h, scale=float(scale), window=int(window),
        mix=float(mix), inv_norm=1.0 / float(gate_normalizer),
        HKV=HKV, G=G, K=K, V=V, W=W, S=S, BG=triton.next_power_of_2(G), BK=BK, BV=BV, BW=BW, BS=BS,
        RECURRENT=state is not None, WINDOWED=comp or mix < 1, SINKQ=q_sink is not q_rope and S > 0, COMP=comp,
        **launch)
    if W > 0 or S > 0:
        liger_decode_kernel_pos[(B,)](pos=pos, win_pos=pos if W == 0 else win_pos,
                                      sink_pos=pos if S == 0 else sink_pos, W=W, S=S)
    return o
