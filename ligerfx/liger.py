"""Liger attention, as in the paper (Lan et al., "Liger: Linearizing LLMs to Gated Recurrent Structures",
arXiv 2503.01496) and its official code. This file is the only place the method's math lives.

For one attention layer, with the model's own projections (no new parameters)::

    q, k, v       = W_q x, W_k x, W_v x          (+ the model's q/k norms; pre-RoPE; per head)
    phi(.)        = softmax over the head dimension          (feature map of the recurrent branch)
    log a_t       = logsigmoid(k_t) / gate_normalizer        (gate from the key projection; "pooling" = identity)
    S_t           = diag(a_t) S_{t-1} + phi(k_t)^T v_t       (GLA state, fp32, one per KV head)
    o_gla_t       = phi(q_t) S_t                             (scale 1, no normaliser)
    o_swa_t       = softmax attention of RoPE(q_t) over RoPE(k_j), t - window <= j <= t, model's scale
    o_t           = mix * o_gla_t + (1 - mix) * o_swa_t      -> the model's own output projection

Design choices (see ``LigerConfig``): the window sees the query itself plus ``window`` previous tokens (65 keys for
64, like the official code); the gate reads the key projection *before* any k-norm and *with* LoRA, so a LoRA on
``k_proj`` changes the gate; the state is kept per KV head (the official code repeats it to every query head, an
identical but ``HQ/HKV`` times larger state). Padded tokens neither write nor decay the state (their k, v and gate
are zeroed) and are never attended to. ``variant="swa_sinks"`` drops the recurrent branch and keeps the first
``sinks`` tokens visible: the training-free sliding-window baseline.

Attention sinks and positions (``LigerConfig.sink_position``, ligerfx's, after StreamingLLM): a query past position
``P = sink_position`` scores the sinks it sees outside its window with itself RoPE'd at ``P`` instead of at its own
position, so a sink is never farther back than the model was trained to look (for Gemma 3, whose local layers see
512 tokens, ``P = 511``); below ``P`` nothing changes. ``sink_attention`` adds the sinks to the window-only softmax
through its log-sum-exp; the pass clones the model's own RoPE subgraph to build the query at ``P``.

``variant="complementary"`` (ligerfx's own, not in the paper; still no new parameters) splits the past instead of
averaging two views of it: the window (+ sinks) softmax covers the last ``window`` tokens as above, and the GLA state
holds only the tokens that have *left* the window (sinks excluded), with one shared normaliser::

    w_tj          = phi(q_t) . (prod_{i=j+1..t} a_i * phi(k_j))     for every j outside the window (not a sink)
    o_t           = (o_swa_t + sum_j w_tj v_j) / (1 + sum_j w_tj)

The window gets a total mass of 1 and each token beyond it its GLA weight ``w_tj``, so a sequence the window sees
whole is attended exactly as by the teacher, and the state only adds what the window no longer sees. The GLA runs
over ``[v, 1]`` (its last output channel is the normaliser ``sum_j w_tj``) with each query reading the state as it
was ``window + 1`` tokens earlier (``complementary_branch``); the cache keeps the pre-RoPE keys and gate inputs of
the ring, so a token is pushed into the state when it leaves the ring.

A call without a cache and with ``T <= window + 1`` tokens (``fits_window``: short prompts being scored) has every
earlier token inside every query's window, so the sinks add nothing and the complementary GLA part is zero: it runs
the window kernel alone (the same numbers, bit for bit). ``gla`` still runs its recurrent branch.

A decode step (one token per sequence onto an allocated cache, autograd off) runs as one fused op
(``decode_step``: ``ligerfx::liger_decode_``) instead of the branch-by-branch path; ``LIGERFX_FUSED_DECODE=0``
(read at import, or set ``ligerfx.liger.FUSED_DECODE = False``) keeps the branch-by-branch path for every call.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .config import LigerConfig
from . import ops

FUSED_DECODE = os.environ.get("LIGERFX_FUSED_DECODE", "1") != "0"


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi: softmax over the head dimension, in fp32."""
    return torch.softmax(x.float(), dim=-1)


def log_gate(k_proj: torch.Tensor, normalizer: float) -> torch.Tensor:
    """log a_t = logsigmoid(k_t) / normalizer, elementwise on the key projection (per key channel)."""
    return F.logsigmoid(k_proj.float()) / normalizer


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    """dtype the attention matmuls run in: autocast's when it is on (what it gives the SDPA we replace), else the
    model's (that of ``v``). Feature maps and gates are computed in fp32 and then cast; the state stays fp32."""
    if torch.is_autocast_enabled(v.device.type):
        return torch.get_autocast_dtype(v.device.type)
    return v.dtype


def gla_branch(q, k, v, gate_src, cfg: LigerConfig, valid: Optional[torch.Tensor], h0: Optional[torch.Tensor]):
    """Recurrent branch. q: [B, HQ, T, K], k/gate_src: [B, HKV, T, K], v: [B, HKV, T, V] -> (o fp32, state fp32).

    phi(q), phi(k) and v enter the kernel in the compute dtype (bf16 under autocast or for a bf16 model: tensor-core
    matmuls); the gate (its cumulative sum) and the state are fp32."""
    cd = compute_dtype(v)
    phi_q, phi_k, g = feature_map(q), feature_map(k), log_gate(gate_src, cfg.gate_normalizer)
    if valid is not None:  # padded tokens write nothing (k = v = 0) and decay nothing (g = 0)
        m = valid[:, None, :, None]
        phi_k, v, g = phi_k * m, v * m, g * m
    return ops.gla_fwd(phi_q.to(cd), phi_k.to(cd), v.to(cd), g, h0)


def swa_branch(q, k, v, q_pos, k_pos, scale: float, cfg: LigerConfig, q_sink=None, sink_position=None,
               whole: bool = False):
    """Window branch on RoPE'd q/k: each query sees itself and ``cfg.window`` previous tokens (+ sinks), in the
    compute dtype (models that upcast q/k in their norms hand us fp32 q/k even under bf16 autocast).

    With ``q_sink`` (the query RoPE'd at position ``sink_position``, same layout as ``q``) the sinks a query sees
    outside its window are scored by ``q_sink`` once the query is past ``sink_position``: see ``sink_attention``.
    ``whole=True`` promises that every query's window holds all earlier keys (``fits_window``): no sink can be
    outside it, so the window kernel alone is the answer."""
    cd = compute_dtype(v)
    if whole:
        o, _ = ops.swa_fwd(q.to(cd), k.to(cd), v.to(cd), q_pos, k_pos, float(scale), int(cfg.window), 0)
        return o
    if q_sink is None or cfg.n_sinks == 0:
        o, _ = ops.swa_fwd(q.to(cd), k.to(cd), v.to(cd), q_pos, k_pos, float(scale), int(cfg.window),
                           int(cfg.n_sinks))
        return o
    o_w, lse_w = ops.swa_fwd(q.to(cd), k.to(cd), v.to(cd), q_pos, k_pos, float(scale), int(cfg.window), 0)
    return sink_attention(o_w, lse_w, q, q_sink, k, v, q_pos, k_pos, scale, int(cfg.window), cfg.n_sinks,
                          int(sink_position)).to(cd)


def sink_attention(o_w, lse_w, q, q_sink, k, v, q_pos, k_pos, scale: float, window: int, sinks: int,
                   sink_position: int) -> torch.Tensor:
    """Add the attention sinks to a window-only softmax (``o_w``, ``lse_w``: its output and log-sum-exp), fp32.

    Sink ``i`` (the token at position ``i < sinks``) joins query ``t``'s softmax when it is outside the window
    (``t - i > window``) with the score ``scale * q'_t . RoPE_i(k_i)``, where ``q'_t`` is ``q_t`` (RoPE'd at ``t``)
    while ``t <= sink_position`` and ``q_sink_t`` (the same query RoPE'd at ``sink_position``) after: a sink is never
    seen farther back than ``sink_position - i`` tokens, the largest distance the model was trained on (StreamingLLM
    scores its sinks by their place in the cache, not in the text, for the same reason). Below ``sink_position``
    this is the window + sinks softmax exactly. Shapes: q, q_sink ``[B, HQ, T, D]``; k ``[B, HKV, TK, D]``; v
    ``[B, HKV, TK, V]``; ``k_pos`` locates the sinks among the keys (``-1``: padding/empty)."""
    B, HQ, T, D = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    G = HQ // HKV
    idx = torch.arange(sinks, device=k_pos.device)
    sel = (k_pos[:, None, :] == idx[None, :, None])  # [B, S, TK]: one key per present sink
    one = sel.to(torch.float32)
    ks = torch.einsum("bsj,bhjd->bhsd", one, k.float())
    vs = torch.einsum("bsj,bhjd->bhsd", one, v.float())
    rolled = (q_pos > sink_position)[:, None, :, None]
    qs = torch.where(rolled, q_sink.float(), q.float()).view(B, HKV, G, T, D)
    s = torch.einsum("bhgtd,bhsd->bhgts", qs, ks) * scale
    vis = sel.any(-1)[:, None, :] & (q_pos[:, :, None] - idx[None, None, :] > window) & (q_pos[:, :, None] >= 0)
    s = s.masked_fill(~vis[:, None, None], float("-inf"))
    lw = lse_w.float().view(B, HKV, G, T)
    m = torch.maximum(lw, s.amax(-1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    a, b = (lw - m).exp(), (s - m[..., None]).exp()
    num = o_w.float().view(B, HKV, G, T, V) * a[..., None] + torch.einsum("bhgts,bhsv->bhgtv", b, vs)
    den = (a + b.sum(-1))[..., None]
    o = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))
    return o.view(B, HQ, T, V)


def mix(o_gla: Optional[torch.Tensor], o_swa: Optional[torch.Tensor], cfg: LigerConfig, dtype: torch.dtype):
    w = cfg.recurrent_weight
    if o_swa is None:
        return o_gla.to(dtype)
    if o_gla is None:
        return o_swa.to(dtype)
    return (w * o_gla + (1.0 - w) * o_swa.float()).to(dtype)


def complementary_branch(q_pre, k_pre, v, gate_src, pos, cfg: LigerConfig, cache=None, padded: bool = True):
    """GLA part of ``variant="complementary"``: for each query, ``sum_j w_tj [v_j, 1]`` over the tokens outside its
    window (fp32 ``[B, HQ, T, V + 1]``; the last channel is the normaliser). ``pos`` ``[B, T]``: positions of the new
    tokens (``-1`` = padding; ``padded=False`` promises there is none). With a ``cache``, its ring (the last ``window`` tokens before this call) and its state
    (every earlier token but the sinks) come first, and the state after this call is written back.

    How: valid tokens are moved to the end of each row (stable), so that "``window + 1`` positions back" is "``window
    + 1`` indices back"; with a state to read, one empty token leads. The GLA then runs over all but the last
    ``window`` tokens with the query of token ``e`` placed at index ``e - window - 1`` and scaled by the gates of the
    tokens in between (``exp`` of a difference of fp64 cumulative gates, ``<= 0``): its output there is exactly the
    state outside ``e``'s window, decayed up to ``e``. Its final state holds every token but the last ``window``."""
    W, L = int(cfg.window), int(cfg.window) + 1
    B, HQ, T, K = q_pre.shape
    HKV, V = k_pre.shape[1], v.shape[-1]
    h0 = None
    if cache is not None:
        h0 = cache.initial_state()
        hk, hv, hg, hp = cache.history()
        k_pre, v = torch.cat([hk, k_pre.to(hk.dtype)], 2), torch.cat([hv, v.to(hv.dtype)], 2)
        gate_src, pos = torch.cat([hg, gate_src.to(hg.dtype)], 2), torch.cat([hp, pos], 1)
        q_pre = torch.cat([q_pre.new_zeros(B, HQ, hk.shape[2], K), q_pre], 2)
    N, H0 = k_pre.shape[2], q_pre.shape[2] - T  # tokens in all, history tokens
    valid = pos >= 0
    compact = cache is not None or padded
    if compact:  # padding first, valid tokens in order after it
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
        take = lambda x: x.gather(2, order[:, None, :, None].expand(x.shape[0], x.shape[1], N, x.shape[-1]))
        q_pre, k_pre, v, gate_src = take(q_pre), take(k_pre), take(v), take(gate_src)
        pos, valid = pos.gather(1, order), valid.gather(1, order)
    cd = compute_dtype(v)
    write = (pos >= cfg.n_sinks)[:, None, :, None]  # valid and not a sink: may enter the state
    phi_k = feature_map(k_pre) * write
    v1 = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1) * write
    g = log_gate(gate_src, cfg.gate_normalizer) * valid[:, None, :, None]
    phi_q = feature_map(q_pre)
    lead = 1 if h0 is not None else 0  # an empty first token: reading there = reading h0
    if lead:
        phi_k, v1, g, phi_q = (F.pad(x, (0, 0, 1, 0)) for x in (phi_k, v1, g, phi_q))
    M = N + lead
    S = max(M - W, 0)  # GLA steps: every token but the last W (those stay in the window / ring)
    o = phi_q.new_zeros(B, HQ, M, V + 1)
    if S > 0:
        G = F.pad(g.double().cumsum(2), (0, 0, 1, 0))  # G[:, :, i] = sum of g over tokens < i
        R = M - L  # queries that have a state to read: e = s + L for s in [0, R)
        if R > 0:
            # gates of tokens s+1 .. e, i.e. G[e+1] - G[s+1]
            dG = (G[:, :, L + 1:M + 1] - G[:, :, 1:R + 1]).float()
            dG = dG.repeat_interleave(HQ // HKV, dim=1)
            qs = phi_q[:, :, L:] * dG.exp()
            qs = F.pad(qs, (0, 0, 0, S - R))
        else:
            qs = phi_q.new_zeros(B, HQ, S, K)
        o_lag, hT = ops.gla_fwd(qs.to(cd), phi_k[:, :, :S].to(cd), v1[:, :, :S].to(cd), g[:, :, :S].contiguous(),
                                h0)
        if R > 0:
            o = torch.cat([o.new_zeros(B, HQ, L, V + 1), o_lag[:, :, :R]], 2)
    else:
        hT = h0 if h0 is not None else v.new_zeros(B, HKV, K, V + 1, dtype=torch.float32)
    if cache is not None:
        cache.update_state(hT)
    # back to the new tokens' own order
    if compact:
        inv = torch.argsort(order, dim=1)[:, H0:] + lead
        o = o.gather(2, inv[:, None, :, None].expand(B, HQ, T, V + 1))
    else:
        o = o[:, :, lead + H0:]
    return o


def combine_complementary(o_swa: torch.Tensor, o_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(o_swa + sum_j w_tj v_j) / (1 + sum_j w_tj)``: the window's mass is 1, each token beyond it weighs w_tj."""
    return ((o_swa.float() + o_out[..., :-1]) / (1.0 + o_out[..., -1:])).to(dtype)


def fits_window(T: int, cfg: LigerConfig, cache) -> bool:
    """True when no token of a ``T``-token call can be outside any query's window: no cache (positions start at 0)
    and ``T <= window + 1``. Then the sinks are inside every window (``sink_attention`` adds nothing) and, for
    ``variant="complementary"``, no token has left a window (its GLA part is zero): both are skipped. Decided from
    the shape alone, so it costs no host sync. Short scoring calls (lm-eval's multiple-choice prompts) take this."""
    return cache is None and T <= int(cfg.window) + 1


def positions(valid: Optional[torch.Tensor], B: int, T: int, device, start: Optional[torch.Tensor] = None):
    """Per-sequence position of each new token among the *valid* tokens (``-1`` for padding)."""
    if valid is None:
        pos = torch.arange(T, device=device).expand(B, T)
    else:
        pos = valid.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    if valid is not None:
        pos = pos.masked_fill(~valid, -1)
    return pos


def liger_attention(q_pre, k_pre, v, gate_src, q_rope, k_rope, *, scale: float, cfg: LigerConfig,
                    valid: Optional[torch.Tensor] = None, cache=None, q_sink: Optional[torch.Tensor] = None,
                    sink_position: Optional[int] = None) -> torch.Tensor:
    """Liger attention for one layer. Shapes as SDPA sees them ([B, H, T, D]); returns [B, HQ, T, V].

    ``q_sink`` (optional, like ``q_rope``): the query RoPE'd at position ``sink_position``, which scores the
    attention sinks once a query is past that position (``sink_attention``); None: sinks at their true distance.

    ``cache`` (a ``ligerfx.cache.LigerLayer``) carries the GLA state and the window of past keys/values between
    calls (prefill, then decode steps); it is read before and updated in place after this call. A decode step
    without autograd takes ``decode_step`` (unless ``LIGERFX_FUSED_DECODE=0``).
    """
    B, _, T, _ = q_rope.shape
    if cache is not None:
        cache.prepare(k_rope, v)
        if FUSED_DECODE and T == 1 and cache.seen is not None and not torch.is_grad_enabled():
            return decode_step(q_pre, k_pre, v, gate_src, q_rope, k_rope, scale=scale, cfg=cfg, valid=valid,
                               cache=cache, q_sink=q_sink, sink_position=sink_position)
    whole = fits_window(T, cfg, cache)
    if cfg.variant == "complementary":
        if whole:  # nothing has left the window: o = o_swa / (1 + 0)
            q_pos = positions(valid, B, T, q_rope.device)
            return swa_branch(q_rope, k_rope, v, q_pos, q_pos, scale, cfg, whole=True).to(v.dtype)
        start = cache.seen if cache is not None else None
        q_pos = positions(valid, B, T, q_rope.device, start)
        o_out = complementary_branch(q_pre, k_pre, v, gate_src, q_pos, cfg, cache, padded=valid is not None)
        if cache is not None:
            keys, values, k_pos = cache.window_keys(k_rope, v, q_pos)
        else:
            keys, values, k_pos = k_rope, v, q_pos
        o_swa = swa_branch(q_rope, keys, values, q_pos, k_pos, scale, cfg, q_sink, sink_position)
        if cache is not None:
            cache.advance(k_rope, v, q_pos, extra=(k_pre, gate_src))
        return combine_complementary(o_swa, o_out, v.dtype)
    o_gla = o_swa = None
    if cfg.recurrent_weight > 0:
        o_gla, state = gla_branch(q_pre, k_pre, v, gate_src, cfg, valid,
                                  cache.initial_state() if cache is not None else None)
        if cache is not None:
            cache.update_state(state)
    start = cache.seen if cache is not None else None
    q_pos = positions(valid, B, T, q_rope.device, start)
    if cfg.recurrent_weight < 1:
        if cache is not None:
            keys, values, k_pos = cache.window_keys(k_rope, v, q_pos)
        else:
            keys, values, k_pos = k_rope, v, q_pos
        o_swa = swa_branch(q_rope, keys, values, q_pos, k_pos, scale, cfg, q_sink, sink_position, whole=whole)
    if cache is not None:
        cache.advance(k_rope, v, q_pos)
    return mix(o_gla, o_swa, cfg, v.dtype)


def decode_step(q_pre, k_pre, v, gate_src, q_rope, k_rope, *, scale: float, cfg: LigerConfig,
                valid: Optional[torch.Tensor], cache, q_sink: Optional[torch.Tensor] = None,
                sink_position: Optional[int] = None) -> torch.Tensor:
    """``liger_attention`` for one new token per sequence (T == 1) onto an allocated ``cache``, autograd off: the
    same math in one op (``ligerfx::liger_decode_``: feature maps, gate, state update, window over the sinks, the
    ring and the token itself, mix, then the token's ring and sink writes, all in place), then the counters. A
    missing branch (``swa_sinks``: no state; ``mix=1``: no ring) is skipped inside the op; ``complementary`` reads
    the state decayed to the token, shares the window's normaliser and pushes the ring's oldest token into the
    state (the op's ``win_kp`` / ``win_gs`` mode). Differences from the
    branch-by-branch path: the feature maps and the window branch's output are not rounded to the compute dtype
    before the state update and the mix (fp32 throughout)."""
    pos = positions(valid, q_rope.shape[0], 1, q_rope.device, cache.seen)
    qs = None
    if q_sink is not None and sink_position is not None and cfg.n_sinks > 0:  # past P: sinks scored from P
        qs = torch.where((pos > int(sink_position))[:, None, :, None], q_sink, q_rope)
    o = ops.liger_decode_(q_pre, k_pre, v, gate_src, q_rope, k_rope, pos, cache.state, cache.win_k, cache.win_v,
                          cache.win_pos, cache.sink_k, cache.sink_v, cache.sink_pos, cache.win_kp, cache.win_gs,
                          float(scale), int(cfg.window), float(cfg.recurrent_weight), float(cfg.gate_normalizer), qs)
    cache.count((pos >= 0).sum(1), 1)
    return o
