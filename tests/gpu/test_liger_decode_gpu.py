"""The fused decode step (``ligerfx::liger_decode_``, Triton on CUDA) at realistic shapes against its naive twin in
float64, over 20 steps in a row (not run in CI).

    TRITON_INTERPRET=0 LIGERFX_AUTOTUNE=0 python -m pytest -q tests/gpu/test_liger_decode_gpu.py

Criterion (as ``test_kernels_gpu.py``): ``||out - ref|| / ||ref||`` <= 1e-2 for bf16 inputs, <= 1e-4 for fp32, for
the output of every step; the fp32 state <= 1e-4 after every step; ring and sink slots and their positions exactly
equal (they hold copies of the inputs). The reference keeps its own float64 buffers, starting from the same random
state and ring contents (rows at different points of the ring: empty, partly filled, just full, wrapped); the
last row gets a padding token every fourth step. Outputs are NaN-poisoned before each call.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]

import ligerfx  # noqa: E402,F401  (registers the ops and the Triton kernels for CUDA)
from ligerfx.kernels.liger import naive  # noqa: E402
from reference import rel  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
NAMES = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "pos", "state", "win_k", "win_v", "win_pos",
         "sink_k", "sink_v", "sink_pos")
BUFFERS = ("state", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos")
VARIANTS = {"gla": (0.5, 0), "gla_sinks": (0.5, 4), "swa_sinks": (0.0, 4)}  # mix, sinks


def buffers(B, HKV, K, V, W, S, seen, dtype, recurrent):
    """State and ring as a cache holds them after ``seen`` tokens per row (random contents)."""
    last = seen[:, None] - 1
    held = last - torch.remainder(last - torch.arange(W, device=DEV), W)
    x = dict(state=torch.randn(B, HKV, K, V, device=DEV) if recurrent else None,
             win_k=torch.randn(B, HKV, W, K, device=DEV).to(dtype),
             win_v=torch.randn(B, HKV, W, V, device=DEV).to(dtype),
             win_pos=held.masked_fill(held < 0, -1), sink_k=None, sink_v=None, sink_pos=None)
    if S:
        sp = torch.arange(S, device=DEV).expand(B, S)
        x.update(sink_k=torch.randn(B, HKV, S, K, device=DEV).to(dtype),
                 sink_v=torch.randn(B, HKV, S, V, device=DEV).to(dtype),
                 sink_pos=sp.masked_fill(sp >= seen[:, None], -1))
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("HQ,HKV,D", [(32, 8, 64), (32, 8, 128), (8, 4, 256)])
def test_decode_steps_match_float64(HQ, HKV, D, variant, dtype):
    mix, S = VARIANTS[variant]
    B, W, scale = 4, 64, D ** -0.5
    seen = torch.tensor([0, 3, 62, 100], device=DEV)
    bufs = buffers(B, HKV, D, D, W, S, seen, dtype, recurrent=mix > 0)
    ref = {n: None if t is None else (t.double() if t.is_floating_point() else t.clone()) for n, t in bufs.items()}
    for step in range(20):
        x = dict(q_pre=torch.randn(B, HQ, 1, D, device=DEV) * 2, k_pre=torch.randn(B, HKV, 1, D, device=DEV) * 2,
                 v=torch.randn(B, HKV, 1, D, device=DEV), gate_src=torch.randn(B, HKV, 1, D, device=DEV),
                 q_rope=torch.randn(B, HQ, 1, D, device=DEV), k_rope=torch.randn(B, HKV, 1, D, device=DEV))
        x = {n: t.to(dtype) for n, t in x.items()}
        pad = torch.zeros(B, dtype=torch.bool, device=DEV)
        pad[-1] = step % 4 == 1
        pos = seen.masked_fill(pad, -1)[:, None]
        o = torch.ops.ligerfx.liger_decode_(*(x[n] for n in NAMES[:6]), pos, *(bufs[n] for n in BUFFERS), None, None,
                                            scale, W, mix, 16.0)
        o_ref = naive.liger_decode(*(x[n].double() for n in NAMES[:6]), pos, *(ref[n] for n in BUFFERS), scale, W,
                                   mix, 16.0)
        assert o.dtype == dtype and o.shape == (B, HQ, 1, D)
        assert rel(o, o_ref) <= TOL[dtype], step
        if bufs["state"] is not None:
            assert rel(bufs["state"], ref["state"]) <= 1e-4, step
        for n in BUFFERS[1:]:
            if bufs[n] is not None:
                assert torch.equal(bufs[n].to(ref[n].dtype), ref[n]), (n, step)
        seen = seen + (~pad).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sink_query_matches_naive(dtype):
    """``liger_decode_(..., q_sink)``: the sink slots scored with the sink query (``LigerConfig.sink_position``),
    Triton vs the naive twin on the card; the buffers written exactly alike. Measured on an NVIDIA H200 (session
    15): rel(o) 1.2e-7 (fp32), 0 (bf16)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_liger_decode import MUTATED, NAMES as OP_NAMES, _sink_query_inputs
    from ligerfx.kernels.liger import decode

    x, q_sink = _sink_query_inputs(dtype)
    x = {n: None if t is None else t.to(DEV) for n, t in x.items()}
    outs = []
    for fn in (decode.liger_decode, naive.liger_decode):
        y = {n: None if t is None else t.clone() for n, t in x.items()}
        outs.append((fn(*(y[n] for n in OP_NAMES), 0.3, 4, 0.5, 16.0, q_sink.to(DEV)), y))
    (o, y), (o_ref, y_ref) = outs
    assert rel(o.float(), o_ref.float()) <= TOL[dtype]
    assert rel(y["state"], y_ref["state"]) <= 1e-4
    for n in MUTATED:
        if n != "state":
            assert torch.equal(y[n], y_ref[n]), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("HQ,HKV,D", [(32, 8, 64), (4, 1, 256)])
def test_complementary_decode_steps_match_float64(HQ, HKV, D, dtype):
    """``variant="complementary"`` (the op's ``win_kp`` / ``win_gs`` mode): state of D + 1 columns, 4 sinks, the ring
    of 64; 20 steps in a row against the float64 naive twin, rows at different points of the ring (tokens leave it
    for the state once it is full), the last row padded every fourth step."""
    B, W, S, scale = 4, 64, 4, D ** -0.5
    seen = torch.tensor([0, 3, 62, 100], device=DEV)
    bufs = buffers(B, HKV, D, D, W, S, seen, dtype, recurrent=True)
    bufs["state"] = torch.rand(B, HKV, D, D + 1, device=DEV) * 2
    bufs["win_kp"] = (torch.randn(B, HKV, W, D, device=DEV) * 2).to(dtype)
    bufs["win_gs"] = (torch.randn(B, HKV, W, D, device=DEV) + 1).to(dtype)
    names = BUFFERS + ("win_kp", "win_gs")
    ref = {n: None if t is None else (t.double() if t.is_floating_point() else t.clone()) for n, t in bufs.items()}
    for step in range(20):
        x = dict(q_pre=torch.randn(B, HQ, 1, D, device=DEV) * 2, k_pre=torch.randn(B, HKV, 1, D, device=DEV) * 2,
                 v=torch.randn(B, HKV, 1, D, device=DEV), gate_src=torch.randn(B, HKV, 1, D, device=DEV) + 1,
                 q_rope=torch.randn(B, HQ, 1, D, device=DEV), k_rope=torch.randn(B, HKV, 1, D, device=DEV))
        x = {n: t.to(dtype) for n, t in x.items()}
        pad = torch.zeros(B, dtype=torch.bool, device=DEV)
        pad[-1] = step % 4 == 1
        pos = seen.masked_fill(pad, -1)[:, None]
        o = torch.ops.ligerfx.liger_decode_(*(x[n] for n in NAMES[:6]), pos, *(bufs[n] for n in BUFFERS),
                                            bufs["win_kp"], bufs["win_gs"], scale, W, 0.5, 16.0)
        o_ref = naive.liger_decode(*(x[n].double() for n in NAMES[:6]), pos, *(ref[n] for n in BUFFERS), scale, W,
                                   0.5, 16.0, None, ref["win_kp"], ref["win_gs"])
        assert o.dtype == dtype and o.shape == (B, HQ, 1, D)
        assert not torch.isnan(o).any()
        assert rel(o, o_ref) <= TOL[dtype], step
        assert rel(bufs["state"], ref["state"]) <= 1e-4, step
        for n in names[1:]:
            if bufs[n] is not None:
                assert torch.equal(bufs[n].to(ref[n].dtype), ref[n]), (n, step)
        seen = seen + (~pad).long()
