"""The fused Liger-attention op on a CUDA GPU at realistic shapes against a float64 reference (not run in CI).

    TRITON_INTERPRET=0 LIGERFX_AUTOTUNE=0 python -m pytest -q tests/gpu/test_liger_fused_gpu.py

Criterion (as ``test_kernels_gpu.py``): ``||out - ref|| / ||ref||`` <= 1e-2 for bf16 inputs, <= 1e-4 for fp32; the
reference is float64 autograd on the same (rounded) inputs. Checked: o, the final state, and the gradients of
q_pre, k_pre, v, gate_src, q_rope, k_rope, h0 through ``torch.ops.ligerfx.liger_fwd``'s autograd. Strong gates
exercise the sub-chunk path of the phase-2 kernel (in-register reshapes, compiled only on a GPU here).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]

import ligerfx  # noqa: E402,F401  (registers the ops and the Triton kernels for CUDA)
from ligerfx import liger  # noqa: E402
from ligerfx.config import LigerConfig  # noqa: E402
from ligerfx.kernels.liger import fused  # noqa: E402
from test_kernels_gpu import gla_ref64, swa_ref64  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
ARGS = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "pos", "h0")
LEAVES = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "h0")


from reference import rel  # noqa: E402


def liger_ref64(x, scale, window, mix, norm):
    """float64 Liger attention (feature maps, gate, padding, GLA, window, mix), differentiable."""
    phi_q = torch.softmax(x["q_pre"].double(), -1)
    phi_k = torch.softmax(x["k_pre"].double(), -1)
    g = F.logsigmoid(x["gate_src"].double()) / norm
    v = x["v"].double()
    B, _, T, _ = x["q_rope"].shape
    pos = x["pos"]
    if pos is not None:
        m = (pos >= 0)[:, None, :, None].double()
        phi_k, g = phi_k * m, g * m
        v_gla = v * m
    else:
        v_gla = v
        pos = torch.arange(T, device=DEV).expand(B, T)
    o_gla, hT = gla_ref64(phi_q, phi_k, v_gla, g, x["h0"])
    o_swa = swa_ref64(x["q_rope"], x["k_rope"], v, pos, pos, scale, window, 0)
    return mix * o_gla + (1 - mix) * o_swa, hT


def liger_inputs(B, HQ, HKV, T, D, dtype, pads=None, h0=True, strong=False):
    x = dict(
        q_pre=torch.randn(B, HQ, T, D, device=DEV) * 2, k_pre=torch.randn(B, HKV, T, D, device=DEV) * 2,
        v=torch.randn(B, HKV, T, D, device=DEV), gate_src=torch.randn(B, HKV, T, D, device=DEV),
        q_rope=torch.randn(B, HQ, T, D, device=DEV), k_rope=torch.randn(B, HKV, T, D, device=DEV),
    )
    if strong:  # gates down to about -40 per token in half the KV heads, over a stretch of the sequence
        x["gate_src"][:, ::2, T // 3: T // 2] *= 40
    x = {n: t.to(dtype) for n, t in x.items()}
    x["pos"] = None
    if pads is not None:
        valid = torch.ones(B, T, dtype=torch.bool, device=DEV)
        for b, p in enumerate(pads):
            valid[b, :p] = False
        x["pos"] = liger.positions(valid, B, T, DEV)
    x["h0"] = torch.randn(B, HKV, D, D, device=DEV) if h0 else None
    return x


CASES = [  # B, HQ, HKV, T, D, dtype, pads, strong
    (2, 16, 4, 4099, 128, torch.bfloat16, (0, 100), False),
    (1, 8, 8, 8192, 64, torch.bfloat16, None, False),
    (1, 8, 2, 4099, 256, torch.bfloat16, None, False),
    (2, 8, 4, 2085, 128, torch.bfloat16, (0, 37), True),
    (1, 8, 4, 2085, 128, torch.float32, (0,), False),
    (2, 8, 4, 3000, 64, torch.float32, (0, 65), True),
    (1, 4, 1, 1000, 256, torch.float32, None, False),
]


@pytest.mark.parametrize("B,HQ,HKV,T,D,dtype,pads,strong", CASES)
def test_liger_fused(B, HQ, HKV, T, D, dtype, pads, strong):
    norm = 1.0 if strong else 16.0
    scale = D ** -0.5
    x = liger_inputs(B, HQ, HKV, T, D, dtype, pads, strong=strong)
    do = torch.randn(B, HQ, T, D, device=DEV).to(dtype)
    dhT = torch.randn(B, HKV, D, D, device=DEV)

    leaves = {n: x[n].detach().clone().requires_grad_() for n in LEAVES}
    o, hT, lse = torch.ops.ligerfx.liger_fwd(*({**x, **leaves}[n] for n in ARGS), scale, 64, 0.5, norm)
    assert o.dtype == dtype and hT.dtype == lse.dtype == torch.float32
    ((o.float() * do.float()).sum() + (hT * dhT).sum()).backward()

    leaves64 = {n: x[n].detach().double().requires_grad_() for n in LEAVES}
    o_ref, hT_ref = liger_ref64({**x, **leaves64}, scale, 64, 0.5, norm)
    ((o_ref * do.double()).sum() + (hT_ref * dhT.double()).sum()).backward()

    tol = TOL[dtype]
    assert rel(o, o_ref) < tol and rel(hT, hT_ref) < tol
    if pads is not None and B > 1:
        assert torch.all(lse[1, :, :pads[1]] == float("-inf"))  # padded queries see no key
    for n in LEAVES:
        assert leaves[n].grad.dtype == x[n].dtype, n
        assert rel(leaves[n].grad, leaves64[n].grad) < tol, n


@pytest.mark.parametrize("GP", [1, 2, 4])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_liger_fused_heads_per_program(monkeypatch, GP, D):
    """Every number of query heads per phase-2 program (``LIGERFX_LIGER_GP``) gives the same forward (strong gates
    included; bit-exactness is not required across compilations)."""
    monkeypatch.setenv("LIGERFX_LIGER_GP", str(GP))
    x = liger_inputs(2, 16, 4, 1500, D, torch.bfloat16, (0, 50), strong=True)
    o, hT, lse = fused.liger_fwd(*(x[n] for n in ARGS), D ** -0.5, 64, 0.5, 1.0)
    monkeypatch.setenv("LIGERFX_LIGER_GP", "4")
    o4, hT4, lse4 = fused.liger_fwd(*(x[n] for n in ARGS), D ** -0.5, 64, 0.5, 1.0)
    seen = torch.isfinite(lse4)
    assert torch.equal(torch.isfinite(lse), seen) and rel(lse[seen], lse4[seen]) < 1e-5
    assert rel(o, o4) < 1e-3 and rel(hT, hT4) < 1e-5
    o_ref, hT_ref = liger_ref64(x, D ** -0.5, 64, 0.5, 1.0)
    assert rel(o, o_ref) < 1e-2 and rel(hT, hT_ref) < 1e-2


@pytest.mark.parametrize("phase1,states", [("scan", "fp32"), ("seq", "fp32"), ("scan", "bf16"), ("seq", "bf16")])
@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                                     (128, torch.float32)])
def test_liger_fused_phase1_variants(monkeypatch, phase1, states, D, dtype):
    """Forward with both phase-1 variants and both state dtypes (``LIGERFX_LIGER_PHASE1``, ``LIGERFX_LIGER_STATES``)
    against float64, strong gates in half the KV heads (both phase-2 compilations run)."""
    monkeypatch.setenv("LIGERFX_LIGER_PHASE1", phase1)
    monkeypatch.setenv("LIGERFX_LIGER_STATES", states)
    x = liger_inputs(2, 8, 4, 3001, D, dtype, (0, 45), strong=True)
    o, hT, _ = fused.liger_fwd(*(x[n] for n in ARGS), D ** -0.5, 64, 0.5, 1.0)
    o_ref, hT_ref = liger_ref64(x, D ** -0.5, 64, 0.5, 1.0)
    tol = TOL[dtype] if states == "fp32" else 1e-2
    assert rel(o, o_ref) < tol and rel(hT, hT_ref) < tol


def test_liger_fused_matches_unfused_bf16():
    """The op against liger.py's unfused composition (what it replaces), same bf16 inputs, both on the GPU."""
    B, HQ, HKV, T, D = 2, 32, 8, 3000, 128
    x = liger_inputs(B, HQ, HKV, T, D, torch.bfloat16, (0, 200))
    cfg = LigerConfig()
    valid = x["pos"] >= 0
    o_gla, hT_ref = liger.gla_branch(x["q_pre"], x["k_pre"], x["v"], x["gate_src"], cfg, valid, x["h0"])
    o_swa = liger.swa_branch(x["q_rope"], x["k_rope"], x["v"], x["pos"], x["pos"], D ** -0.5, cfg)
    o_ref = liger.mix(o_gla, o_swa, cfg, x["v"].dtype)
    o, hT, _ = torch.ops.ligerfx.liger_fwd(*(x[n] for n in ARGS), D ** -0.5, cfg.window, cfg.mix,
                                           cfg.gate_normalizer)
    assert rel(o, o_ref) < 1e-2 and rel(hT, hT_ref) < 1e-2


def test_liger_fused_strided_inputs():
    """[B, T, H, D] memory (as the projections produce it), permuted to [B, H, T, D] views: no copies, same result."""
    x = liger_inputs(2, 16, 4, 2000, 128, torch.bfloat16, (0, 30))
    y = {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if n not in ("pos", "h0") else t) for n, t in x.items()}
    a = fused.liger_fwd(*(x[n] for n in ARGS), 128 ** -0.5, 64, 0.5, 16.0)
    b = fused.liger_fwd(*(y[n] for n in ARGS), 128 ** -0.5, 64, 0.5, 16.0)
    for u, w in zip(a, b):
        assert torch.equal(u.isfinite(), w.isfinite()) and rel(u[u.isfinite()], w[w.isfinite()]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_liger_fused_gate_grad_along_sequence(dtype):
    """The gate_src gradient at T = 8192 with Liger's gates: within tolerance, and its error does not grow towards
    the start of the sequence (the suffix-sum form of the inter-chunk gate gradient did: see
    tests/test_liger_fused.py::test_gate_grad_precision_long_sequence)."""
    B, HQ, HKV, T, D = 1, 8, 4, 8192, 128
    x = liger_inputs(B, HQ, HKV, T, D, dtype)
    do = torch.randn(B, HQ, T, D, device=DEV).to(dtype)
    dhT = torch.randn(B, HKV, D, D, device=DEV)
    gate = x["gate_src"].detach().clone().requires_grad_()
    o, hT, _ = torch.ops.ligerfx.liger_fwd(*({**x, "gate_src": gate}[n] for n in ARGS), D ** -0.5, 64, 0.5, 16.0)
    ((o.float() * do.float()).sum() + (hT * dhT).sum()).backward()
    gate64 = x["gate_src"].detach().double().requires_grad_()
    o_ref, hT_ref = liger_ref64({**x, "gate_src": gate64}, D ** -0.5, 64, 0.5, 16.0)
    ((o_ref * do.double()).sum() + (hT_ref * dhT.double()).sum()).backward()
    got, ref = gate.grad, gate64.grad
    q = T // 4
    head, tail = rel(got[:, :, :q], ref[:, :, :q]), rel(got[:, :, -q:], ref[:, :, -q:])
    print(f"gate_src grad rel. error {rel(got, ref):.2e}: first quarter {head:.2e}, last quarter {tail:.2e}")
    assert rel(got, ref) < TOL[dtype] and head < 2 * tail
