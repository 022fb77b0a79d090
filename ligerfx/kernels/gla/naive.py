"""Plain-PyTorch gated linear attention (GLA) with per-KV-head state: the reference for every GLA kernel.

Shapes (head-first, the layout Hugging Face attention uses)::

    q: [B, HQ, T, K]   k, g: [B, HKV, T, K]   v: [B, HKV, T, V]   h0, hT: [B, HKV, K, V]

``g`` is the log forget gate (``<= 0``). The ``HQ // HKV`` query heads of a group read the same state, which is
computed and stored once per KV head. Recurrence (scale 1, no normaliser, fp32)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = q_t S_t

Two forward forms with identical math: ``gla_fwd_recurrent`` (a loop over time, used for decode) and
``gla_fwd_chunked`` (intra-chunk attention in closed form, inter-chunk state passing; used for training and prefill).
``gla_bwd_chunked`` is the hand-written backward (autograd is off inside custom-op kernels). Every exponent is a
difference of cumulative gates taken "later minus earlier", hence ``<= 0``: no overflow for any gate strength.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16


def _split(q, k, v, g):
    B, HQ, T, K = q.shape
    HKV = k.shape[1]
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({HKV})")
    return B, HQ, HKV, HQ // HKV, T, K, v.shape[-1]


def gla_fwd_recurrent(q, k, v, g, h0=None):
    """Token-by-token recurrence. Returns ``(o [B,HQ,T,V] fp32, hT [B,HKV,K,V] fp32)``."""
    B, HQ, HKV, G, T, K, V = _split(q, k, v, g)
    q = q.float().view(B, HKV, G, T, K)
    k, v, g = k.float(), v.float(), g.float()
    S = q.new_zeros(B, HKV, K, V) if h0 is None else h0.float().clone()
    o = q.new_empty(B, HKV, G, T, V)
    for t in range(T):
        S = S * g[:, :, t, :, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, :, t] = torch.einsum("bhgk,bhkv->bhgv", q[:, :, :, t], S)
    return o.view(B, HQ, T, V), S


def _chunk(q, k, v, g, C, decay: bool = True):
    """Pad T to a multiple of C (zero gate = no decay, zero k/v = no write) and fold time into [N, C]."""
    B, HQ, HKV, G, T, K, V = _split(q, k, v, g)
    pad = (-T) % C
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C
    q = q.float().reshape(B, HKV, G, N, C, K)
    k = k.float().reshape(B, HKV, N, C, K)
    v = v.float().reshape(B, HKV, N, C, V)
    c = g.float().reshape(B, HKV, N, C, K).cumsum(-2)  # in-chunk cumulative log gate
    dims = (B, HQ, HKV, G, T, K, V, N, C)
    return (q, k, v, c, _decay(c), dims) if decay else (q, k, v, c, dims)


def _decay(c):
    """E[..., i, j, d] = exp(c_i - c_j) for j <= i, else 0 (c: [..., C, K] in-chunk cumulative log gates)."""
    C = c.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=c.device).tril()
    return (c[..., :, None, :] - c[..., None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()


def _chunk_states(k, v, c, h0, dims):
    """State at the start of every chunk and the final state."""
    B, HQ, HKV, G, T, K, V, N, C = dims
    kd = k * (c[..., -1:, :] - c).exp()  # k_j decayed to the chunk end
    S = k.new_zeros(B, HKV, K, V) if h0 is None else h0.float()
    starts = []
    for n in range(N):
        starts.append(S)
        S = S * c[:, :, n, -1, :, None].exp() + kd[:, :, n].transpose(-1, -2) @ v[:, :, n]
    return torch.stack(starts, 2), S, kd  # [B, HKV, N, K, V]


def gla_fwd_chunked(q, k, v, g, h0=None, chunk_size: int = CHUNK, max_bytes: int = 1 << 28):
    """Chunked form. Returns ``(o [B,HQ,T,V] fp32, hT [B,HKV,K,V] fp32)``.

    The decay tensor ``E`` is ``[B, HKV, N, C, C, K]``; it is built for a slice of chunks at a time so that it stays
    under ``max_bytes`` (a batch of long prompts on CPU would otherwise need several GB per layer)."""
    q, k, v, c, dims = _chunk(q, k, v, g, chunk_size, decay=False)
    B, HQ, HKV, G, T, K, V, N, C = dims
    starts, hT, _ = _chunk_states(k, v, c, h0, dims)
    step = max(1, max_bytes // max(1, B * HKV * C * C * K * 4))
    o = torch.empty(B, HKV, G, N, C, V, dtype=torch.float32, device=q.device)
    for n0 in range(0, N, step):
        n = slice(n0, min(N, n0 + step))
        Ek = _decay(c[:, :, n]) * k[:, :, n, None]  # [B, HKV, n, C(i), C(j), K]
        A = torch.einsum("bhgnid,bhnijd->bhgnij", q[:, :, :, n], Ek)
        o[:, :, :, n] = A @ v[:, :, None, n] + torch.einsum(
            "bhgnid,bhndv->bhgniv", q[:, :, :, n] * c[:, :, None, n].exp(), starts[:, :, n])
    return o.reshape(B, HQ, N * C, V)[:, :, :T], hT


def gla_fwd(q, k, v, g, h0=None):
    """Reference forward: recurrent for short inputs (decode), chunked otherwise."""
    if q.shape[2] <= 4:
        return gla_fwd_recurrent(q, k, v, g, h0)
    return gla_fwd_chunked(q, k, v, g, h0)


def gla_bwd_chunked(q, k, v, g, h0, do, dhT, chunk_size: int = CHUNK):
    """Gradients ``(dq, dk, dv, dg, dh0)`` of ``gla_fwd`` given ``do`` and ``dhT`` (either may be None = zero).

    dq, dk, dv follow from the chunked form; the gate gradient uses the identity
    ``d/db_t = q_t . dq_t - k_t . dk_t`` (b = global cumulative gate; summed over the query heads of the group) plus
    ``rowsum(S_T * dhT)`` at the last step, then ``dg = reverse_cumsum(db)``.
    """
    B, HQ, T = q.shape[:3]
    in_dtypes = (q.dtype, k.dtype, v.dtype, g.dtype)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    qc, kc, vc, c, E, dims = _chunk(q, k, v, g, chunk_size)
    _, _, HKV, G, _, K, V, N, C = dims
    pad = N * C - T
    do = F.pad(do.float(), (0, 0, 0, pad)).reshape(B, HKV, G, N, C, V)
    starts, hT, kd = _chunk_states(kc, vc, c, h0, dims)
    qe = qc * c[:, :, None].exp()

    A = torch.einsum("bhgnid,bhnijd,bhnjd->bhgnij", qc, E, kc)
    dA = torch.einsum("bhgniv,bhnjv->bhgnij", do, vc)
    dq = torch.einsum("bhgnij,bhnijd,bhnjd->bhgnid", dA, E, kc)
    dq = dq + torch.einsum("bhgniv,bhndv->bhgnid", do, starts) * c[:, :, None].exp()
    dk = torch.einsum("bhgnij,bhnijd,bhgnid->bhnjd", dA, E, qc)
    dv = torch.einsum("bhgnij,bhgniv->bhnjv", A, do)

    dS = q.new_zeros(B, HKV, K, V, dtype=torch.float32) if dhT is None else dhT.float().clone()
    dk_inter, dv_inter = [], []
    for n in range(N - 1, -1, -1):
        dk_inter.append(torch.einsum("bhjv,bhdv->bhjd", vc[:, :, n], dS) * (c[:, :, n, -1:, :] - c[:, :, n]).exp())
        dv_inter.append(kd[:, :, n] @ dS)
        dS = dS * c[:, :, n, -1, :, None].exp() + torch.einsum("bhgid,bhgiv->bhdv", qe[:, :, :, n], do[:, :, :, n])
    dk = dk + torch.stack(dk_inter[::-1], 2)
    dv = dv + torch.stack(dv_inter[::-1], 2)

    db = (qc * dq).sum(2) - kc * dk  # [B, HKV, N, C, K]
    db = db.reshape(B, HKV, N * C, K)
    if dhT is not None:
        db[:, :, -1] += (hT * dhT.float()).sum(-1)
    dg = db.flip(2).cumsum(2).flip(2)

    dq = dq.reshape(B, HQ, N * C, K)[:, :, :T]
    dk = dk.reshape(B, HKV, N * C, K)[:, :, :T]
    dv = dv.reshape(B, HKV, N * C, V)[:, :, :T]
    dg = dg[:, :, :T]
    return dq.to(in_dtypes[0]), dk.to(in_dtypes[1]), dv.to(in_dtypes[2]), dg.to(in_dtypes[3]), dS
