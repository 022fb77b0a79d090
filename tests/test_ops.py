"""The ligerfx custom ops and their plain-PyTorch kernels against independent float64 references."""
import functools

import pytest
import torch
import torch.nn.functional as F

import ligerfx  # noqa: F401  (registers the ops)
from ligerfx.kernels.gla import naive as gla_naive
from ligerfx.kernels.swa import naive as swa_naive
from reference import gla_recurrence64, window_attention64


from reference import rel  # noqa: E402


def gla_inputs(B=2, HKV=2, G=2, T=37, K=8, V=12, strong=False, dtype=torch.float32):
    q = torch.randn(B, HKV * G, T, K).softmax(-1)
    k = torch.randn(B, HKV, T, K).softmax(-1)
    v = torch.randn(B, HKV, T, V)
    x = torch.randn(B, HKV, T, K) * (8 if strong else 1)
    g = F.logsigmoid(x) / (1 if strong else 16)
    h0 = torch.randn(B, HKV, K, V)
    return [t.to(dtype) for t in (q, k, v, g)] + [h0]


@pytest.mark.parametrize("T", [1, 3, 16, 37, 63, 64, 100])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("strong", [False, True])
def test_gla_forward_matches_float64_recurrence(T, G, strong):
    q, k, v, g, h0 = gla_inputs(T=T, G=G, strong=strong)
    o_ref, h_ref = gla_recurrence64(q, k, v, g, h0)
    sliced = functools.partial(gla_naive.gla_fwd_chunked, max_bytes=1)  # E built one chunk at a time
    for fn in (gla_naive.gla_fwd_chunked, sliced, gla_naive.gla_fwd_recurrent, torch.ops.ligerfx.gla_fwd):
        o, hT = fn(q, k, v, g, h0)
        assert o.dtype == torch.float32 and hT.dtype == torch.float32
        assert not torch.isnan(o).any()
        assert rel(o, o_ref) < 1e-5, fn
        assert rel(hT, h_ref) < 1e-5, fn


def test_gla_split_consistency():
    """Prefill 20 tokens, then continue from the state == one pass over 57 tokens."""
    q, k, v, g, h0 = gla_inputs(T=57)
    o, hT = torch.ops.ligerfx.gla_fwd(q, k, v, g, None)
    o1, h1 = torch.ops.ligerfx.gla_fwd(q[:, :, :20], k[:, :, :20], v[:, :, :20], g[:, :, :20], None)
    o2, h2 = torch.ops.ligerfx.gla_fwd(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], g[:, :, 20:], h1)
    assert rel(torch.cat([o1, o2], 2), o) < 1e-6 and rel(h2, hT) < 1e-6


@pytest.mark.parametrize("T", [5, 37, 64])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("with_h0", [False, True])
def test_gla_backward_matches_float64_autograd(T, G, with_h0):
    q, k, v, g, h0 = gla_inputs(T=T, G=G, strong=True)
    h0 = h0 if with_h0 else None
    do = torch.randn(q.shape[0], q.shape[1], T, v.shape[-1])
    dht = torch.randn(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1])
    leaves64 = [x.double().requires_grad_() for x in (q, k, v, g)] + ([h0.double().requires_grad_()] if with_h0 else [])
    o64, h64 = gla_recurrence64(*leaves64[:4], leaves64[4] if with_h0 else None)
    ((o64 * do.double()).sum() + (h64 * dht.double()).sum()).backward()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)] + ([h0.clone().requires_grad_()] if with_h0 else [])
    o, hT = torch.ops.ligerfx.gla_fwd(*leaves[:4], leaves[4] if with_h0 else None)
    ((o * do).sum() + (hT * dht).sum()).backward()
    for name, a, b in zip("q k v g h0".split(), leaves, leaves64):
        assert rel(a.grad, b.grad) < 1e-4, name


def swa_inputs(B=2, HKV=2, G=2, TQ=40, TK=40, D=8, V=6, pad=(0, 5)):
    q = torch.randn(B, HKV * G, TQ, D)
    k = torch.randn(B, HKV, TK, D)
    v = torch.randn(B, HKV, TK, V)
    k_pos = torch.full((B, TK), -1, dtype=torch.long)
    for b, p in enumerate(pad):
        k_pos[b, p:] = torch.arange(TK - p)
    q_pos = k_pos[:, TK - TQ:]
    return q, k, v, q_pos.contiguous(), k_pos


@pytest.mark.parametrize("window,sinks", [(4, 0), (64, 0), (6, 3)])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("TQ", [1, 9, 40])
def test_swa_forward_and_backward(window, sinks, G, TQ):
    q, k, v, q_pos, k_pos = swa_inputs(G=G, TQ=TQ)
    ref = window_attention64(q, k, v, q_pos, k_pos, 0.3, window, sinks)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = torch.ops.ligerfx.swa_fwd(*leaves, q_pos, k_pos, 0.3, window, sinks)
    assert not torch.isnan(o).any()
    assert rel(o, ref) < 1e-5
    do = torch.randn_like(o)
    (o * do).sum().backward()
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    (window_attention64(*leaves64, q_pos, k_pos, 0.3, window, sinks) * do.double()).sum().backward()
    for name, a, b in zip("qkv", leaves, leaves64):
        assert rel(a.grad, b.grad) < 1e-4, name


def test_swa_padded_query_outputs_zero():
    q, k, v, q_pos, k_pos = swa_inputs(pad=(0, 7))
    o, _ = torch.ops.ligerfx.swa_fwd(q, k, v, q_pos, k_pos, 0.3, 4, 0)
    assert torch.all(o[1, :, :7] == 0) and not torch.isnan(o).any()


def test_opcheck_all_ops():
    q, k, v, g, h0 = gla_inputs(T=19)
    torch.library.opcheck(torch.ops.ligerfx.gla_fwd.default, (q, k, v, g, h0))
    torch.library.opcheck(torch.ops.ligerfx.gla_fwd.default, (q, k, v, g, None))
    do = torch.randn(*q.shape[:3], v.shape[-1])
    torch.library.opcheck(torch.ops.ligerfx.gla_bwd.default, (q, k, v, g, h0, do, None))
    sq, sk, sv, qp, kp = swa_inputs(TQ=9)
    torch.library.opcheck(torch.ops.ligerfx.swa_fwd.default, (sq, sk, sv, qp, kp, 0.3, 4, 0))
    o, lse = torch.ops.ligerfx.swa_fwd(sq, sk, sv, qp, kp, 0.3, 4, 0)
    torch.library.opcheck(torch.ops.ligerfx.swa_bwd.default, (sq, sk, sv, qp, kp, o, lse, torch.randn_like(o), 0.3, 4, 0))
