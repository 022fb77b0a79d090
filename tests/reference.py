"""Independent float64 references written for the tests (they share no code with ligerfx)."""
import torch


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64; fails on any NaN in ``a`` (an unwritten, NaN-poisoned or overflowed element)."""
    assert not torch.isnan(a).any(), "NaN (unwritten or overflowed element)"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gla_recurrence64(q, k, v, g, h0=None):
    """o_t = q_t S_t, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t; k/v/g per KV head, q per query head. float64."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    B, HQ, T, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    G = HQ // HKV
    S = torch.zeros(B, HKV, K, V, dtype=torch.float64) if h0 is None else h0.double()
    out = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        St = S.repeat_interleave(G, dim=1)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], St))
    return torch.stack(out, 2), S


def window_attention64(q, k, v, q_pos, k_pos, scale, window, sinks=0):
    """Softmax over keys with k_pos <= q_pos and (q_pos - k_pos <= window or k_pos < sinks); -1 = invalid."""
    return window_sinks64(q, q, k, v, q_pos, k_pos, scale, window, sinks, sink_position=float("inf"))


def complementary64(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, scale, window, sinks, normalizer):
    """``variant="complementary"`` written out per query in float64: window (+ sinks) softmax, plus every valid
    non-sink key beyond the window with weight w = sum_c softmax(q)_c softmax(k_j)_c exp(sum of the log gates of the
    valid tokens after j up to the query), all under one normaliser: (o_swa + sum w v) / (1 + sum w).
    ``pos`` [B, T]: token positions, -1 = padding."""
    o_swa = window_attention64(q_rope, k_rope, v, pos, pos, scale, window, sinks)
    G = q_pre.shape[1] // k_pre.shape[1]
    pq = q_pre.double().softmax(-1)
    pk = k_pre.double().softmax(-1).repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    lg = (torch.nn.functional.logsigmoid(gate_src.double()) / normalizer).repeat_interleave(G, 1)
    B, H, T, _ = q_pre.shape
    out = o_swa.clone()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p < 0:
                continue
            num = torch.zeros(H, v.shape[-1], dtype=torch.float64)
            den = torch.zeros(H, dtype=torch.float64)
            for j in range(T):
                pj = int(pos[b, j])
                if pj < sinks or pj > p - window - 1:
                    continue
                later = [i for i in range(T) if pj < int(pos[b, i]) <= p]
                decay = lg[b, :, later].sum(1).exp() if later else torch.ones_like(pq[b, :, t])
                w = (pq[b, :, t] * pk[b, :, j] * decay).sum(-1)  # [H]
                num += w[:, None] * vv[b, :, j]
                den += w
            out[b, :, t] = (o_swa[b, :, t] + num) / (1 + den[:, None])
    return out


def window_sinks64(q, q_sink, k, v, q_pos, k_pos, scale, window, sinks, sink_position):
    """Window + sinks softmax where a query past ``sink_position`` scores the sinks outside its window with
    ``q_sink`` (its own RoPE at ``sink_position``) instead of ``q``; keys inside the window always with ``q``.
    float64, one query at a time; -1 positions are invalid."""
    q, qs, k, v = q.double(), q_sink.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    B, H, TQ, _ = q.shape
    out = torch.zeros(B, H, TQ, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for i in range(TQ):
            qp = int(q_pos[b, i])
            if qp < 0:
                continue
            scores, vals = [], []
            for j in range(k.shape[2]):
                kp = int(k_pos[b, j])
                if kp < 0 or kp > qp:
                    continue
                if qp - kp <= window:
                    scores.append(torch.einsum("hd,hd->h", q[b, :, i], k[b, :, j]) * scale)
                elif kp < sinks:
                    qq = qs[b, :, i] if qp > sink_position else q[b, :, i]
                    scores.append(torch.einsum("hd,hd->h", qq, k[b, :, j]) * scale)
                else:
                    continue
                vals.append(v[b, :, j])
            if scores:
                p = torch.stack(scores, -1).softmax(-1)
                out[b, :, i] = torch.einsum("hj,jhv->hv", p, torch.stack(vals, 0))
    return out
