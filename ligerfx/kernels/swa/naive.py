"""Plain-PyTorch sliding-window softmax attention with positions: the reference for every window kernel.

Shapes::

    q: [B, HQ, TQ, D]   k: [B, HKV, TK, D]   v: [B, HKV, TK, V]   q_pos: [B, TQ]   k_pos: [B, TK]   (int64)

Positions count the *valid* tokens of each sequence (``-1`` marks padding or an empty cache slot), so left padding,
a ring buffer of past keys and attention sinks all reduce to one rule. Query ``i`` sees key ``j`` iff::

    k_pos[j] >= 0  and  q_pos[i] >= 0  and  k_pos[j] <= q_pos[i]
    and (q_pos[i] - k_pos[j] <= window  or  k_pos[j] < sinks)

i.e. itself plus ``window`` previous tokens (65 keys for window 64, as the official Liger code), plus the first
``sinks`` tokens. The ``HQ // HKV`` query heads of a group share k and v (GQA without repeating them). A query that
sees no key (a padded position) outputs zeros. Softmax in fp32; the output has q's dtype, ``lse`` is fp32.
"""
from __future__ import annotations

import torch

QBLOCK = 512  # queries per block: bounds the score matrix to QBLOCK x TK


def visible(q_pos, k_pos, window: int, sinks: int):
    """[B, TQ, TK] boolean visibility of key j to query i."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    near = (qp - kp) <= window
    if sinks > 0:
        near = near | (kp < sinks)
    return (kp >= 0) & (qp >= 0) & (kp <= qp) & near


def swa_fwd(q, k, v, q_pos, k_pos, scale: float, window: int, sinks: int = 0):
    B, HQ, TQ, D = q.shape
    HKV, TK, V = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    qf = q.float().view(B, HKV, G, TQ, D)
    kf, vf = k.float(), v.float()
    o = q.new_empty(B, HKV, G, TQ, V, dtype=torch.float32)
    lse = q.new_empty(B, HKV, G, TQ, dtype=torch.float32)
    for s in range(0, TQ, QBLOCK):
        e = min(s + QBLOCK, TQ)
        m = visible(q_pos[:, s:e], k_pos, window, sinks)[:, None, None]  # [B,1,1,tq,TK]
        scores = torch.einsum("bhgid,bhjd->bhgij", qf[:, :, :, s:e], kf) * scale
        scores = scores.masked_fill(~m, float("-inf"))
        l = torch.logsumexp(scores, -1)  # -inf for rows that see nothing
        p = (scores - l[..., None]).exp().nan_to_num(0.0)
        o[:, :, :, s:e] = p @ vf[:, :, None]
        lse[:, :, :, s:e] = l
    return o.view(B, HQ, TQ, V).to(q.dtype), lse.view(B, HQ, TQ)


def swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, scale: float, window: int, sinks: int = 0, dlse=None):
    """Gradients ``(dq, dk, dv)`` of ``swa_fwd`` given ``do`` (and ``dlse``, the gradient of ``lse``, or None).

    ``d lse / d s_ij = p_ij``, so ``dlse`` enters as ``ds_ij = p_ij (dp_ij - (delta_i - dlse_i))``."""
    B, HQ, TQ, D = q.shape
    HKV, TK, V = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    qf = q.float().view(B, HKV, G, TQ, D)
    kf, vf = k.float(), v.float()
    dof = do.float().view(B, HKV, G, TQ, V)
    delta = (dof * o.float().view(B, HKV, G, TQ, V)).sum(-1)  # rowsum(do * o)
    if dlse is not None:
        delta = delta - dlse.float().view(B, HKV, G, TQ)
    lse = lse.view(B, HKV, G, TQ)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for s in range(0, TQ, QBLOCK):
        e = min(s + QBLOCK, TQ)
        m = visible(q_pos[:, s:e], k_pos, window, sinks)[:, None, None]
        scores = torch.einsum("bhgid,bhjd->bhgij", qf[:, :, :, s:e], kf) * scale
        p = (scores - lse[:, :, :, s:e, None]).exp().masked_fill(~m, 0.0).nan_to_num(0.0)
        dv += torch.einsum("bhgij,bhgiv->bhjv", p, dof[:, :, :, s:e])
        dp = dof[:, :, :, s:e] @ vf[:, :, None].transpose(-1, -2)
        ds = p * (dp - delta[:, :, :, s:e, None]) * scale
        dq[:, :, :, s:e] = ds @ kf[:, :, None]
        dk += torch.einsum("bhgij,bhgid->bhjd", ds, qf[:, :, :, s:e])
    return dq.view(B, HQ, TQ, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
