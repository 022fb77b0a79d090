"""Plain-PyTorch Liger attention (recurrent + window branch in one call): the reference for the fused kernels.
``liger_fwd`` / ``liger_bwd`` run a whole sequence without a cache; ``liger_decode`` (documented at its definition)
runs one decode step onto a cache's buffers, in place.

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


def liger_decode(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, state, win_k, win_v, win_pos, sink_k, sink_v,
                 sink_pos, scale: float, window: int, mix: float, gate_normalizer: float, q_sink=None, win_kp=None,
                 win_gs=None):
    """One decode step (one new token per sequence) of Liger attention onto a ``ligerfx.cache.LigerLayer``'s
    buffers, which it updates in place. The reference of ``decode.py``'s kernel and of ``ligerfx::liger_decode_``.

    Shapes (``S`` sink slots, ``W`` ring slots)::

        q_pre, q_rope: [B, HQ, 1, K]   k_pre, gate_src, k_rope: [B, HKV, 1, K]   v: [B, HKV, 1, V]
        pos: [B, 1] int64, the new token's position (-1 = padding)
        state: [B, HKV, K, V] fp32 or None (no recurrent branch: ``variant="swa_sinks"``)
        win_k: [B, HKV, W, K], win_v: [B, HKV, W, V], win_pos: [B, W] int64 (-1 = empty), or all None (no ring)
        sink_k: [B, HKV, S, K], sink_v: [B, HKV, S, V], sink_pos: [B, S] int64, or all None (no sinks)
        -> o [B, HQ, 1, V] in v's dtype

    Math (``liger.py``'s branch-by-branch decode step)::

        phi_q, phi_k = softmax(q_pre), softmax(k_pre) over the head dim;  g = logsigmoid(gate_src) / gate_normalizer
        S            = diag(exp g) S + phi_k^T v       (in place; a padded row keeps its state)
        o_gla        = phi_q S                          (every query head of the KV head's group)
        o_swa        = softmax(scale q_rope . k) v over the sink slots, the ring and the new token itself, key at
                       position p visible iff 0 <= p <= pos and (pos - p <= window or p < S); ring slots holding a
                       position < S are skipped (that token sits in a sink slot); a padded row sees nothing (0)
        o            = mix * o_gla + (1 - mix) * o_swa  (a missing branch contributes 0: no state, or mix == 1)

    ``q_sink`` (optional, like ``q_rope``) scores the sink slots instead of ``q_rope`` (the caller passes the query
    RoPE'd at the sink position once the token is past it: ``LigerConfig.sink_position``).

    ``win_kp``, ``win_gs`` (``[B, HKV, W, K]``, given together): ``variant="complementary"``
    (``liger.complementary_branch`` for one token): the state ``[B, HKV, K, V + 1]`` holds only the tokens that left
    the ring (its last column is the normaliser) and ``mix`` is not used::

        a_j          = exp(logsigmoid(win_gs_j) / gate_normalizer)      for every occupied ring slot j
        read         = phi_q (diag(prod_j a_j * exp g) S)               the state decayed up to the new token
        o            = (o_swa + read[:V]) / (1 + read[V])               one normaliser: the window's mass is 1
        S            = diag(a_old) S + phi(k_old)^T [v_old, 1]          then the ring's oldest token (slot pos % W,
                                                                        if occupied) leaves it for the state; a
                                                                        sink token (position < S) only decays it

    and a padded row keeps its state (and outputs 0). Then, for a valid row only, the new k_rope / v (and k_pre / gate_src into
    win_kp / win_gs) go into ring slot ``pos % W`` and, if ``pos < S``, into sink slot ``pos``, with their
    positions. The new key and value enter the window rounded to the buffers' dtype (as they
    will be read back at the next steps). Math in fp32 (float64 for float64 inputs); the counters (``seen``,
    ``length``) are the caller's.
    """
    B, HQ, _, K = q_pre.shape
    HKV, V = k_rope.shape[1], v.shape[-1]
    G = HQ // HKV
    f = torch.float64 if v.dtype == torch.float64 else torch.float32
    pos = pos.reshape(B)
    valid = pos >= 0
    v_new = v[:, :, 0].to(f)  # [B, HKV, V]
    o = torch.zeros(B, HKV, G, V, dtype=f, device=v.device)

    n_sinks = 0 if sink_k is None else sink_k.shape[2]
    rows = torch.arange(B, device=v.device)
    comp = win_kp is not None
    if comp and (state is None or win_k is None or win_gs is None):
        raise ValueError("liger_decode: the complementary step needs the state, the ring, win_kp and win_gs")
    if comp:
        lg = lambda x: F.logsigmoid(x.to(f)) / gate_normalizer  # noqa: E731
        S0 = state.to(f)
        g_read = ((lg(win_gs) * (win_pos >= 0)[:, None, :, None]).sum(2)
                  + lg(gate_src[:, :, 0]) * valid[:, None, None])  # [B, HKV, K]
        phi_q = torch.softmax(q_pre[:, :, 0].to(f), -1).view(B, HKV, G, K) * valid[:, None, None, None]
        read = torch.einsum("bhgk,bhkv->bhgv", phi_q, S0 * g_read.exp()[..., None])  # [B, HKV, G, V + 1]
        slot = pos.clamp_min(0) % win_k.shape[2]
        old = win_pos[rows, slot]
        push = valid & (old >= 0)
        write = (push & (old >= n_sinks)).to(f)[:, None, None]
        a_old = (lg(win_gs[rows, :, slot]) * push[:, None, None]).exp()  # [B, HKV, K]
        phi_old = torch.softmax(win_kp[rows, :, slot].to(f), -1) * write
        v_old = win_v[rows, :, slot].to(f)
        v1 = torch.cat([v_old, torch.ones_like(v_old[..., :1])], -1)
        state.copy_(S0 * a_old[..., None] + phi_old[..., None] * v1[:, :, None, :])
    elif state is not None:
        phi_q = torch.softmax(q_pre[:, :, 0].to(f), -1).view(B, HKV, G, K)
        phi_k = torch.softmax(k_pre[:, :, 0].to(f), -1)
        g = F.logsigmoid(gate_src[:, :, 0].to(f)) / gate_normalizer
        S = state.to(f) * g.exp()[..., None] + phi_k[..., None] * v_new[:, :, None, :]
        S = torch.where(valid[:, None, None, None], S, state.to(f))
        o += mix * torch.einsum("bhgk,bhkv->bhgv", phi_q, S)
        state.copy_(S)

    buf = sink_k if sink_k is not None else win_k
    k_new = k_rope[:, :, 0] if buf is None else k_rope[:, :, 0].to(buf.dtype)  # [B, HKV, K]
    v_kept = v[:, :, 0] if buf is None else v[:, :, 0].to(buf.dtype)
    if comp or mix < 1:
        keys, values, k_pos = [], [], []
        if sink_k is not None:
            keys.append(sink_k), values.append(sink_v), k_pos.append(sink_pos)
        if win_k is not None:
            keys.append(win_k), values.append(win_v), k_pos.append(win_pos.masked_fill(win_pos < n_sinks, -1))
        keys.append(k_new[:, :, None]), values.append(v_kept[:, :, None]), k_pos.append(pos[:, None])
        k_all = torch.cat([x.to(f) for x in keys], 2)  # [B, HKV, N, K]
        v_all = torch.cat([x.to(f) for x in values], 2)
        kp, qp = torch.cat(k_pos, 1), pos[:, None]  # [B, N], [B, 1]
        seen = (kp >= 0) & (kp <= qp) & ((qp - kp <= window) | (kp < n_sinks))
        q = q_rope[:, :, 0].to(f).view(B, HKV, G, K)
        scores = torch.einsum("bhgk,bhnk->bhgn", q, k_all) * scale
        if q_sink is not None and n_sinks:
            qs = q_sink[:, :, 0].to(f).view(B, HKV, G, K)
            scores = torch.cat([torch.einsum("bhgk,bhnk->bhgn", qs, k_all[:, :, :n_sinks]) * scale,
                                scores[..., n_sinks:]], -1)
        p = torch.softmax(scores.masked_fill(~seen[:, None, None], float("-inf")), -1).nan_to_num(0.0)
        o += (1.0 if comp else 1.0 - mix) * (p @ v_all)
    if comp:
        o = (o + read[..., :V]) / (1.0 + read[..., V:])

    with torch.no_grad():
        if win_k is not None:
            slot = pos.clamp_min(0) % win_k.shape[2]
            ring = [(win_k, k_new), (win_v, v_kept)]
            if comp:
                ring += [(win_kp, k_pre[:, :, 0].to(win_kp.dtype)), (win_gs, gate_src[:, :, 0].to(win_gs.dtype))]
            for buf_, new_ in ring:
                buf_[rows, :, slot] = torch.where(valid[:, None, None], new_, buf_[rows, :, slot])
            win_pos[rows, slot] = torch.where(valid, pos, win_pos[rows, slot])
        if sink_k is not None:
            slot, into = pos.clamp(0, n_sinks - 1), valid & (pos < n_sinks)
            sink_k[rows, :, slot] = torch.where(into[:, None, None], k_new, sink_k[rows, :, slot])
            sink_v[rows, :, slot] = torch.where(into[:, None, None], v_kept, sink_v[rows, :, slot])
            sink_pos[rows, slot] = torch.where(into, pos, sink_pos[rows, slot])
    return o.reshape(B, HQ, 1, V).to(v.dtype)
