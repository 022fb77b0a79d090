"""The fused Liger-attention op (``ligerfx::liger_fwd`` / ``liger_bwd``) against its naive twin, against the
unfused composition in ``ligerfx/liger.py`` and (gate gradient) against float64.

The Triton kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``) in fp32 at
tiny shapes; every buffer it allocates is NaN-poisoned, so an element it forgets to write fails the comparison.
"""
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from ligerfx import liger  # noqa: E402
from ligerfx.config import LigerConfig  # noqa: E402
from ligerfx.kernels import triton_impls  # noqa: E402
from ligerfx.kernels.gla import chunk  # noqa: E402
from ligerfx.kernels.liger import fused, naive  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("nan_poison")


from reference import rel  # noqa: E402


def liger_inputs(B=2, HKV=2, G=2, T=37, K=16, V=16, pads=None, h0=True, gate_scale=1.0, dtype=torch.float32):
    """Model-like inputs; ``pads[b]`` left-padded slots in row b (None: no positions tensor)."""
    x = dict(
        q_pre=torch.randn(B, HKV * G, T, K) * 2, k_pre=torch.randn(B, HKV, T, K) * 2, v=torch.randn(B, HKV, T, V),
        gate_src=torch.randn(B, HKV, T, K) * gate_scale, q_rope=torch.randn(B, HKV * G, T, K),
        k_rope=torch.randn(B, HKV, T, K),
    )
    x = {n: t.to(dtype) for n, t in x.items()}
    valid = None
    if pads is not None:
        valid = torch.ones(B, T, dtype=torch.bool)
        for b, p in enumerate(pads):
            valid[b, :p] = False
    x["pos"] = None if valid is None else liger.positions(valid, B, T, "cpu")
    x["h0"] = torch.randn(B, HKV, K, V) if h0 else None
    return x, valid


ARGS = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "pos", "h0")


def call(fn, x, scale=0.3, window=64, mix=0.5, norm=16.0):
    return fn(*(x[n] for n in ARGS), scale, window, mix, norm)


def check_fwd(x, tol=TOL, **kw):
    o, hT, lse = call(fused.liger_fwd, x, **kw)
    o_ref, hT_ref, lse_ref = call(naive.liger_fwd, {n: t if n in ("pos", "h0") or t is None else t.float()
                                                    for n, t in x.items()}, **kw)
    assert o.dtype == x["v"].dtype and hT.dtype == lse.dtype == torch.float32
    assert rel(o, o_ref) < tol and rel(hT, hT_ref) < tol
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), seen) and rel(lse[seen], lse_ref[seen]) < tol
    return o, hT, lse


# ------------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("T,G,GP,h0,pads", [
    (1, 1, 1, True, None), (37, 2, 2, False, (0, 5)), (37, 4, 1, True, None), (100, 1, 1, True, (0, 30)),
    (100, 2, 1, False, None), (130, 4, 4, True, (0, 70)), (130, 4, 2, False, None), (130, 1, 1, False, None),
])
def test_fused_fwd_matches_naive(monkeypatch, T, G, GP, h0, pads):
    """GP: query heads per program (a loop over the heads of a group sharing the key side; default 1)."""
    monkeypatch.setenv("LIGERFX_LIGER_GP", str(GP))
    x, _ = liger_inputs(B=2, HKV=2 if G < 4 else 1, G=G, T=T, K=16 if T > 64 else 32, V=16 if T > 64 else 24,
                        pads=pads, h0=h0)
    check_fwd(x, window=8 if T == 130 else 64)


def test_fused_fwd_head_dim_64():
    x, _ = liger_inputs(B=1, HKV=1, G=2, T=70, K=64, V=64, pads=None)
    check_fwd(x, scale=64 ** -0.5)


@pytest.mark.parametrize("BT,BV,T,window", [(16, 16, 37, 5), (16, 16, 70, 16), (16, 16, 70, 40), (64, 32, 150, 64),
                                             (64, 32, 150, 100)])
def test_fused_fwd_block_sizes(monkeypatch, BT, BV, T, window):
    """Chunks of 16 and 64 tokens; the state and output split over V blocks; windows spanning up to three earlier
    chunks."""
    monkeypatch.setitem(fused.BLOCKS, 64, (BT, BV, 4, 1))
    x, _ = liger_inputs(B=2, HKV=1, G=2, T=T, K=16, V=40, pads=(0, 9))
    check_fwd(x, window=window, mix=0.3)


@pytest.mark.parametrize("BT,GP,dtype", [(32, 1, torch.float32), (64, 2, torch.float32), (32, 2, torch.float16)])
def test_fused_fwd_strong_gates(monkeypatch, BT, GP, dtype):
    """Gates down to about -40 per token: chunks take the sub-chunk path (phi_k and c in registers), mixed with
    chunks on the one-dot path whose exp(-c) reaches exp(FAST_DECAY) (beyond fp16's range: fp32 operands there)."""
    monkeypatch.setitem(fused.BLOCKS, 64, (BT, 64, 4, 1))
    monkeypatch.setenv("LIGERFX_LIGER_GP", str(GP))
    x, _ = liger_inputs(B=2, HKV=2, G=2, T=150, pads=(0, 40), dtype=dtype)
    x["gate_src"][:, 1, 60:110] *= 40
    o, hT, lse = check_fwd(x, norm=1.0, tol=TOL if dtype == torch.float32 else 1e-2)
    dec = fused.liger_fwd_states(x["k_pre"], x["v"], x["gate_src"], x["pos"], x["h0"], BT, 1.0)[1]
    fast = dec.amin(-1) > -chunk.FAST_DECAY.value
    assert fast.any() and not fast.all()  # both paths ran


@pytest.mark.parametrize("phase1", ["scan", "seq"])
@pytest.mark.parametrize("T,BT,pads,h0", [(37, 16, (0, 5), True), (130, 32, None, False), (150, 64, (0, 70), True)])
def test_fused_states_match_naive(monkeypatch, phase1, T, BT, pads, h0):
    """Phase 1 on its own (both variants: local summaries + scan, one sequential pass): the state entering every
    chunk and the chunk decays, against a loop over the chunks of the naive GLA operands (padded tokens: no write,
    no decay)."""
    monkeypatch.setenv("LIGERFX_LIGER_PHASE1", phase1)
    x, _ = liger_inputs(B=2, HKV=2, G=1, T=T, K=16, V=24, pads=pads, h0=h0)
    h, dec, hT = fused.liger_fwd_states(x["k_pre"], x["v"], x["gate_src"], x["pos"], x["h0"], BT, 16.0)
    _, phi_k, g = naive.features(x["q_pre"][:, :2], x["k_pre"], x["gate_src"], 16.0)
    _, phi_k, v, g = naive.recurrent_inputs(phi_k, phi_k, x["v"], g, naive.padding_mask(x["pos"]))
    S = torch.zeros(2, 2, 16, 24) if x["h0"] is None else x["h0"].clone()
    for n in range(triton.cdiv(T, BT)):
        c = g[:, :, n * BT:(n + 1) * BT].cumsum(2)
        assert rel(h[:, :, n], S) < TOL and rel(dec[:, :, n], c[:, :, -1]) < TOL
        kd = phi_k[:, :, n * BT:(n + 1) * BT] * (c[:, :, -1:] - c).exp()
        S = S * c[:, :, -1, :, None].exp() + kd.transpose(-1, -2) @ v[:, :, n * BT:(n + 1) * BT]
    assert rel(hT, S) < TOL


@pytest.mark.parametrize("phase1,states", [("seq", "fp32"), ("scan", "bf16"), ("seq", "bf16")])
def test_fused_fwd_phase1_variants(monkeypatch, phase1, states):
    """The sequential phase 1 and bf16 chunk states (``LIGERFX_LIGER_PHASE1``, ``LIGERFX_LIGER_STATES``): same
    forward; bf16 states cost about 2^-9 relative on the inter-chunk term."""
    monkeypatch.setenv("LIGERFX_LIGER_PHASE1", phase1)
    monkeypatch.setenv("LIGERFX_LIGER_STATES", states)
    monkeypatch.setitem(fused.BLOCKS, 64, (16, 16, 4, 1))
    x, _ = liger_inputs(B=2, HKV=2, G=2, T=70, K=16, V=24, pads=(0, 9))
    check_fwd(x, tol=TOL if states == "fp32" else 1e-2)


def test_fused_fwd_strided_inputs():
    """Inputs in [B, T, H, D] memory (permuted views, as the graph passes hand them over): no copies needed."""
    x, _ = liger_inputs(B=2, HKV=2, G=2, T=40, pads=(3, 0))
    y = {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if n not in ("pos", "h0") else t) for n, t in x.items()}
    assert not y["q_pre"].is_contiguous()
    o, hT, lse = check_fwd(y)
    o2, hT2, lse2 = call(fused.liger_fwd, x)
    assert torch.equal(o, o2) and torch.equal(hT, hT2)


def test_fused_fwd_fp16():
    x, _ = liger_inputs(B=1, HKV=2, G=2, T=70, pads=None, dtype=torch.float16)
    check_fwd(x, tol=1e-2)


def test_fused_mixed_dtypes():
    """v's dtype is the compute dtype: fp32 q_pre / k_pre / gate_src / q_rope next to fp16 v and k_rope (as models
    that upcast q/k in their norms produce under autocast); o is fp16, every gradient has its input's dtype."""
    x, _ = liger_inputs(B=1, HKV=2, G=2, T=70, pads=None)
    x["v"], x["k_rope"] = x["v"].half(), x["k_rope"].half()
    o, hT, lse = check_fwd(x, tol=1e-2)
    assert o.dtype == torch.float16
    leaves = {n: x[n].clone().requires_grad_() for n in LEAVES}
    with triton_impls.on_cpu():
        o, hT, _ = torch.ops.ligerfx.liger_fwd(*({**x, **leaves}[n] for n in ARGS), 0.3, 64, 0.5, 16.0)
        ((o.float() ** 2).sum() + hT.sum()).backward()
    for n, t in leaves.items():
        assert t.grad.dtype == t.dtype and torch.isfinite(t.grad).all(), n


def test_fused_padding_writes_nothing():
    """Left padding: valid rows and the final state equal those of the unpadded row."""
    x, _ = liger_inputs(B=2, HKV=1, G=2, T=50, pads=(0, 13))
    o, hT, lse = call(fused.liger_fwd, x)
    y = {n: (t[1:, :, 13:] if n not in ("pos", "h0") else t) for n, t in x.items()}
    y["pos"], y["h0"] = None, x["h0"][1:]
    o1, hT1, lse1 = call(fused.liger_fwd, y)
    assert rel(o[1:, :, 13:], o1) < TOL and rel(hT[1:], hT1) < TOL and rel(lse[1:, :, 13:], lse1) < TOL
    assert torch.all(lse[1, :, :13] == float("-inf"))


# -------------------------------------------------------------------------------------- against liger.py, grads
def unfused(x, valid, scale, cfg):
    """liger.py's unfused composition (gla_branch, swa_branch, mix) with the final state."""
    o_gla, hT = liger.gla_branch(x["q_pre"], x["k_pre"], x["v"], x["gate_src"], cfg, valid, x["h0"])
    B, _, T, _ = x["q_rope"].shape
    pos = liger.positions(valid, B, T, "cpu")
    o_swa = liger.swa_branch(x["q_rope"], x["k_rope"], x["v"], pos, pos, scale, cfg)
    return liger.mix(o_gla, o_swa, cfg, x["v"].dtype), hT


LEAVES = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "h0")


def grads_of(fn, x, do, dhT):
    leaves = {n: x[n].clone().requires_grad_() for n in LEAVES if x[n] is not None}
    o, hT = fn({**x, **leaves})
    ((o * do).sum() + (hT * dhT).sum()).backward()
    return o.detach(), hT.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("T,G,h0,pads", [(37, 2, True, (0, 6)), (100, 4, False, None), (130, 1, True, (0, 70))])
def test_op_matches_unfused_liger_with_grads(T, G, h0, pads):
    """torch.ops.ligerfx.liger_fwd + autograd (Triton forward and backward) == liger.py's unfused composition
    (reference kernels): output, final state and every gradient."""
    cfg = LigerConfig(window=8 if T == 130 else 64, mix=0.5)
    x, valid = liger_inputs(B=2, HKV=4 // G if G < 4 else 1, G=G, T=T, pads=pads, h0=h0)
    do = torch.randn(*x["q_rope"].shape[:3], x["v"].shape[-1])
    dhT = torch.randn(x["k_pre"].shape[0], x["k_pre"].shape[1], 16, 16)
    ref = grads_of(lambda y: unfused(y, valid, 0.3, cfg), x, do, dhT)

    def op(y):
        o, hT, _ = torch.ops.ligerfx.liger_fwd(*(y[n] for n in ARGS), 0.3, cfg.window, cfg.mix, cfg.gate_normalizer)
        return o, hT

    with triton_impls.on_cpu():
        got = grads_of(op, x, do, dhT)
    reference_op = grads_of(op, x, do, dhT)  # the CPU default: the naive twin
    for res in (got, reference_op):
        assert rel(res[0], ref[0]) < TOL and rel(res[1], ref[1]) < TOL
        assert res[2].keys() == ref[2].keys()
        for n in ref[2]:
            assert rel(res[2][n], ref[2][n]) < TOL, n


def test_op_strong_gates_grads():
    """Strong gates (gate_normalizer 1) through the op's autograd: Triton path == naive twin."""
    x, _ = liger_inputs(B=1, HKV=1, G=2, T=80, gate_scale=8.0)
    do, dhT = torch.randn(1, 2, 80, 16), torch.randn(1, 1, 16, 16)

    def op(y):
        o, hT, _ = torch.ops.ligerfx.liger_fwd(*(y[n] for n in ARGS), 0.3, 64, 0.5, 1.0)
        return o, hT

    with triton_impls.on_cpu():
        got = grads_of(op, x, do, dhT)
    ref = grads_of(op, x, do, dhT)
    for a, b in zip(got[:2], ref[:2]):
        assert rel(a, b) < TOL
    for n in ref[2]:
        assert rel(got[2][n], ref[2][n]) < TOL, n


def test_opcheck():
    x, _ = liger_inputs(B=2, HKV=1, G=2, T=9, K=8, V=8, pads=(0, 3))
    args = tuple(x[n] for n in ARGS)
    torch.library.opcheck(torch.ops.ligerfx.liger_fwd.default, (*args, 0.3, 4, 0.5, 16.0))
    y, _ = liger_inputs(B=1, HKV=1, G=1, T=9, K=8, V=8, h0=False)
    torch.library.opcheck(torch.ops.ligerfx.liger_fwd.default, (*(y[n] for n in ARGS), 0.3, 4, 0.5, 16.0))
    o, hT, lse = torch.ops.ligerfx.liger_fwd(*args, 0.3, 4, 0.5, 16.0)
    torch.library.opcheck(torch.ops.ligerfx.liger_bwd.default,
                          (*args, lse, torch.randn_like(o), torch.randn_like(hT), 0.3, 4, 0.5, 16.0))


def test_registered_for_cuda_and_on_cpu():
    from ligerfx import ops
    assert ops._IMPLS["liger_fwd"].get("cuda") is triton_impls.IMPLS["liger_fwd"]
    assert "cpu" not in ops._IMPLS["liger_fwd"]
    with triton_impls.on_cpu():
        assert ops._IMPLS["liger_bwd"]["cpu"] is triton_impls.IMPLS["liger_bwd"]
    assert "cpu" not in ops._IMPLS["liger_bwd"]


def test_heads_per_program(monkeypatch):
    monkeypatch.delenv("LIGERFX_LIGER_GP", raising=False)
    assert fused._heads_per_program(4) == 1 and fused._heads_per_program(1) == 1
    monkeypatch.setenv("LIGERFX_LIGER_GP", "3")
    assert fused._heads_per_program(4) == 2 and fused._heads_per_program(7) == 1 and fused._heads_per_program(6) == 3
    monkeypatch.setenv("LIGERFX_LIGER_GP", "8")
    assert fused._heads_per_program(4) == 4


def gla_ref64(phi_q, phi_k, v, g, h0):
    """float64 GLA by the recurrence (state per KV head), differentiable."""
    B, HQ, T, _ = phi_q.shape
    G = HQ // phi_k.shape[1]
    S, outs = h0, []
    for t in range(T):
        S = S * g[:, :, t, :, None].exp() + phi_k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((phi_q[:, :, t, None, :] @ S.repeat_interleave(G, 1))[:, :, 0])
    return torch.stack(outs, 2), S


@pytest.mark.parametrize("strong", [False, True])
def test_gate_grad_precision_long_sequence(strong):
    """The gate_src gradient against float64 at T = 1000 in fp32 (on an H200 the suffix-sum form gave 1.9e-4 in
    fp32 and 2.0e-2 in bf16 at T ~ 2K-4K, the GPU test's strong-gate cases).

    The gradient of the log gate at row t sums the in-chunk reverse cumsum of q dq - k dk and what chunk n's end
    state sends back. Taken as the suffix sum over every later chunk (``chunk.chunk_gla_bwd``), the terms of all
    later chunks cancel against each other and their rounding errors add up: the error is largest at the start
    of the sequence and grows with T (Liger gates: 1.4e-6 to 1.7e-6 over seeds, first quarter 1.5x to 2.6x the
    last; gate_normalizer 1 with a stretch of gates x40, where the true gradient is small: 0.9e-5 to 1.2e-5). From
    the states (``fused.gla_bwd``: rowsum(h_end * dh_end) per chunk) it is 4e-7 (flat along the sequence) and
    2.7e-6 to 3.8e-6."""
    T, K, mix = 1000, 16, 0.5
    norm, tol = (1.0, 6e-6) if strong else (16.0, 1e-6)
    x, _ = liger_inputs(B=1, HKV=1, G=2, T=T, K=K, V=K, h0=True)
    if strong:
        x["gate_src"][:, :, T // 3: T // 2] *= 40
    do, dhT = torch.randn(1, 2, T, K), torch.randn(1, 1, K, K)
    leaves = {n: x[n].clone().requires_grad_() for n in LEAVES}
    with triton_impls.on_cpu():
        o, hT, _ = torch.ops.ligerfx.liger_fwd(*({**x, **leaves}[n] for n in ARGS), 0.3, 64, mix, norm)
        ((o * do).sum() + (hT * dhT).sum()).backward()

    gate = x["gate_src"].double().requires_grad_()
    phi_q, phi_k = torch.softmax(x["q_pre"].double(), -1), torch.softmax(x["k_pre"].double(), -1)
    o64, hT64 = gla_ref64(phi_q, phi_k, x["v"].double(), F.logsigmoid(gate) / norm, x["h0"].double())
    ((mix * o64 * do.double()).sum() + (hT64 * dhT.double()).sum()).backward()
    got, ref = leaves["gate_src"].grad, gate.grad
    assert rel(got, ref) < tol
    if not strong:
        q = T // 4
        assert rel(got[:, :, :q], ref[:, :, :q]) < 1.4 * rel(got[:, :, -q:], ref[:, :, -q:])
