"""Triton kernels (run by Triton's CPU interpreter, fp32) against their plain-PyTorch twins in ``kernels/*/naive.py``.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported. Shapes are tiny: the interpreter runs each
program's block operations through numpy. Every buffer the kernels allocate is NaN-poisoned, so an element a kernel
forgets to write fails the comparison.
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

import ligerfx  # noqa: E402,F401  (registers the ops)
from ligerfx.kernels import triton_impls  # noqa: E402
from ligerfx.kernels.gla import chunk, recurrent  # noqa: E402
from ligerfx.kernels.gla import naive as gla_naive  # noqa: E402
from ligerfx.kernels.swa import naive as swa_naive  # noqa: E402
from ligerfx.kernels.swa import window  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("nan_poison")


from reference import rel  # noqa: E402




# ------------------------------------------------------------------------------------------------------------ GLA
def gla_inputs(B=1, HKV=1, G=1, T=7, K=16, V=16, strong=False, h0=True):
    q = torch.randn(B, HKV * G, T, K).softmax(-1)
    k = torch.randn(B, HKV, T, K).softmax(-1)
    v = torch.randn(B, HKV, T, V)
    x = torch.randn(B, HKV, T, K) * (8 if strong else 1)
    g = F.logsigmoid(x) / (1 if strong else 16)
    return q, k, v, g, (torch.randn(B, HKV, K, V) if h0 else None)


def check_gla(q, k, v, g, h0, with_dht=True):
    o, hT = chunk.chunk_gla_fwd(q, k, v, g, h0)
    o_ref, hT_ref = gla_naive.gla_fwd_recurrent(q, k, v, g, h0)
    assert o.dtype == hT.dtype == torch.float32
    assert rel(o, o_ref) < TOL and rel(hT, hT_ref) < TOL
    do = torch.randn_like(o_ref)
    dhT = torch.randn_like(hT_ref) if with_dht else None
    grads = chunk.chunk_gla_bwd(q, k, v, g, h0, do, dhT)
    refs = gla_naive.gla_bwd_chunked(q, k, v, g, h0, do, dhT)
    for name, a, b in zip("dq dk dv dg dh0".split(), grads, refs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel(a, b) < TOL, name


@pytest.mark.parametrize("T,G,h0", [(1, 1, True), (7, 2, False), (7, 4, True), (63, 1, True), (63, 4, False),
                                    (65, 2, True), (65, 1, False)])
def test_gla_chunk_matches_naive(T, G, h0):
    check_gla(*gla_inputs(B=2 if T < 64 else 1, HKV=2 if G < 4 else 1, G=G, T=T, h0=h0))


def test_gla_chunk_strong_gates_many_chunks():
    """Gates down to about -20 per token over three chunks: every exponent must stay <= 0 (no inf, no NaN)."""
    check_gla(*gla_inputs(T=150, K=16, V=16, strong=True), with_dht=False)


def test_gla_chunk_mixed_gate_strength():
    """Chunks with mild gates (one-dot path) next to a chunk with strong gates (sub-chunk path)."""
    q, k, v, g, h0 = gla_inputs(HKV=2, G=2, T=170)
    g[:, 1, 70:120] = F.logsigmoid(torch.randn(1, 50, 16) * 8)
    check_gla(q, k, v, g, h0)


def test_gla_chunk_split_head_dims():
    """Head dims that are no power of two and span two K blocks (BK = 64)."""
    check_gla(*gla_inputs(T=20, K=80, V=24, G=2))


def test_gla_chunk_padded_tokens():
    """Left padding (k = v = 0, g = 0) leaves the state untouched: valid rows equal the unpadded run."""
    q, k, v, g, h0 = gla_inputs(B=2, T=30, G=2)
    pad = 9
    for x in (k, v, g):
        x[1, :, :pad] = 0
    o, hT = chunk.chunk_gla_fwd(q, k, v, g, h0)
    o1, hT1 = chunk.chunk_gla_fwd(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], g[1:, :, pad:], h0[1:])
    assert rel(o[1:, :, pad:], o1) < TOL and rel(hT[1:], hT1) < TOL
    check_gla(q, k, v, g, h0)


@pytest.mark.parametrize("T,G,h0", [(1, 1, True), (1, 4, False), (3, 2, True)])
def test_gla_recurrent_matches_naive(T, G, h0):
    q, k, v, g, h0 = gla_inputs(B=2, HKV=2, G=G, T=T, K=32, V=24, h0=h0)
    o, hT = recurrent.recurrent_gla_fwd(q, k, v, g, h0)
    o_ref, hT_ref = gla_naive.gla_fwd_recurrent(q, k, v, g, h0)
    assert rel(o, o_ref) < TOL and rel(hT, hT_ref) < TOL


def test_gla_custom_op_autograd_with_triton():
    """torch.ops.ligerfx.gla_fwd + autograd routed through the Triton kernels (T above the recurrent cut-off)."""
    q, k, v, g, h0 = gla_inputs(HKV=2, G=2, T=recurrent.MAX_T + 5, strong=True)
    do, dht = torch.randn(1, 4, q.shape[2], 16), torch.randn(1, 2, 16, 16)
    grads = []
    for use_triton in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
        with triton_impls.on_cpu() if use_triton else torch.enable_grad():
            o, hT = torch.ops.ligerfx.gla_fwd(*leaves)
            ((o * do).sum() + (hT * dht).sum()).backward()
        grads.append([x.grad for x in leaves] + [o.detach(), hT.detach()])
    for name, a, b in zip("q k v g h0 o hT".split(), grads[1], grads[0]):
        assert rel(a, b) < TOL, name


# ------------------------------------------------------------------------------------------------------------ SWA
def swa_inputs(B=2, HKV=2, G=2, TQ=40, TK=40, D=8, V=6, left=(0, 5), right=(0, 0)):
    """Positions 0.. after ``left[b]`` padded slots and before ``right[b]`` empty ones; queries = the last TQ keys."""
    q = torch.randn(B, HKV * G, TQ, D)
    k = torch.randn(B, HKV, TK, D)
    v = torch.randn(B, HKV, TK, V)
    k_pos = torch.full((B, TK), -1, dtype=torch.long)
    for b in range(B):
        k_pos[b, left[b]:TK - right[b]] = torch.arange(TK - left[b] - right[b])
    return q, k, v, k_pos[:, TK - TQ:].contiguous(), k_pos


def check_swa(q, k, v, q_pos, k_pos, scale, w, s):
    o, lse = window.swa_fwd(q, k, v, q_pos, k_pos, scale, w, s)
    o_ref, lse_ref = swa_naive.swa_fwd(q, k, v, q_pos, k_pos, scale, w, s)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert rel(o, o_ref) < TOL
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), seen) and rel(lse[seen], lse_ref[seen]) < TOL
    assert torch.all(o[~seen] == 0)
    do = torch.randn_like(o)
    grads = window.swa_bwd(q, k, v, q_pos, k_pos, o, lse, do, scale, w, s)
    refs = swa_naive.swa_bwd(q, k, v, q_pos, k_pos, o_ref, lse_ref, do, scale, w, s)
    for name, a, b in zip("dq dk dv".split(), grads, refs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel(a, b) < TOL, name


@pytest.mark.parametrize("window_,sinks", [(4, 0), (64, 0), (4, 3), (64, 3)])
@pytest.mark.parametrize("G,TQ", [(1, 40), (2, 9), (4, 1)])
def test_swa_matches_naive(window_, sinks, G, TQ):
    check_swa(*swa_inputs(G=G, TQ=TQ), 0.3, window_, sinks)


@pytest.mark.parametrize("sinks", [0, 3])
def test_swa_long_padded_both_ends(sinks):
    """Several key blocks (most skipped), left padding, empty cache slots at the end, queries shorter than keys."""
    q, k, v, q_pos, k_pos = swa_inputs(B=2, HKV=1, G=2, TQ=150, TK=300, D=16, V=16, left=(3, 70), right=(0, 20))
    check_swa(q, k, v, q_pos, k_pos, 0.25, 5, sinks)


def test_swa_block_ranges_cover_band_and_skip():
    """Device-side block ranges: every visible (query, key) pair is covered, and far blocks are skipped."""
    q, k, v, q_pos, k_pos = swa_inputs(B=2, TQ=500, TK=520, left=(0, 37), right=(13, 0))
    for w, s in [(4, 0), (64, 3), (100, 0)]:
        vis = swa_naive.visible(q_pos, k_pos, w, s)  # [B, TQ, TK]
        BM = 16
        rng = window._key_ranges(q_pos, k_pos, w, s, BM)
        j = torch.arange(k_pos.shape[1])
        for b in range(2):
            for i in range(q_pos.shape[1]):
                lo, hi, sink = rng[b, i // BM].tolist()
                covered = (j < sink) | ((j >= lo) & (j < hi))
                assert not (vis[b, i] & ~covered).any()
        assert (rng[..., 1] - rng[..., 0]).max() <= BM + w + 1
        BN = 32
        rng = window._query_ranges(q_pos, k_pos, w, s, BN)
        i = torch.arange(q_pos.shape[1])
        for b in range(2):
            for jj in range(k_pos.shape[1]):
                lo, hi = rng[b, jj // BN].tolist()
                assert not (vis[b, :, jj] & ~((i >= lo) & (i < hi))).any()


def test_swa_custom_op_autograd_with_triton():
    q, k, v, q_pos, k_pos = swa_inputs(G=2, TQ=20)
    do = torch.randn(2, 4, 20, 6)
    grads = []
    for use_triton in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with triton_impls.on_cpu() if use_triton else torch.enable_grad():
            o, _ = torch.ops.ligerfx.swa_fwd(*leaves, q_pos, k_pos, 0.3, 4, 3)
            (o * do).sum().backward()
        grads.append([x.grad for x in leaves] + [o.detach()])
    for name, a, b in zip("q k v o".split(), grads[1], grads[0]):
        assert rel(a, b) < TOL, name


def test_register_is_explicit():
    """Importing the kernels registers nothing for CPU; on_cpu() restores the previous table."""
    from ligerfx import ops
    assert "cpu" not in ops._IMPLS["gla_fwd"]
    with triton_impls.on_cpu():
        assert ops._IMPLS["gla_fwd"]["cpu"] is triton_impls.gla_fwd
    assert "cpu" not in ops._IMPLS["gla_fwd"]


# ------------------------------------------------------------------------------------------------------- autotuning
def _bits(t):
    """NaN-safe content for equality (buffers are NaN-poisoned)."""
    return torch.nan_to_num(t, nan=7.0) if t.is_floating_point() else t


@contextlib.contextmanager
def _record_launches():
    """Inside the block, every ``@autotune`` kernel launch appends ``(launcher, kwargs, names of the tensor arguments
    it changed)`` to the yielded list."""
    from ligerfx.kernels import utils

    launches = []
    orig = utils._Launcher.__getitem__

    def record(self, grid):
        launch = orig(self, grid)

        def run(**kw):
            before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
            out = launch(**kw)
            written = {n for n, t in before.items() if not torch.equal(_bits(t), _bits(kw[n]))}
            launches.append((self, kw, written))
            return out
        return run

    utils._Launcher.__getitem__ = record
    try:
        yield launches
    finally:
        utils._Launcher.__getitem__ = orig


def test_aliased_launch_arguments_are_restored_when_tuning():
    """With ``LIGERFX_AUTOTUNE=1`` Triton's tuner times every config on the real arguments. A launch whose input and
    output are the same buffer (the in-place chunk scans) would read its own output from the second timed run on, so
    the tuned result would be wrong. Every launch of every kernel (GLA chunk fwd/bwd with and without h0, recurrent,
    SWA, fused Liger fwd/bwd) is recorded; where two tensor arguments share memory, the kernel's launcher must
    restore the one written (``autotune(..., restore=[...])``). Aliased arguments none of which the launch changes
    (the same positions passed as query and key positions) and an argument a ``USE_<NAME>=False`` flag disables
    are harmless and ignored."""
    from ligerfx.kernels.liger import fused
    from test_liger_fused import call, liger_inputs

    with _record_launches() as launches:
        for h0 in (True, False):
            q, k, v, g, h = gla_inputs(B=1, HKV=2, G=2, T=70, h0=h0)
            o, hT = chunk.chunk_gla_fwd(q, k, v, g, h)
            chunk.chunk_gla_bwd(q, k, v, g, h, torch.randn_like(o), torch.randn_like(hT))
            recurrent.recurrent_gla_fwd(q[:, :, :3], k[:, :, :3], v[:, :, :3], g[:, :, :3], h)
            x, _ = liger_inputs(T=70, h0=h0, pads=(0, 5))
            o, hT, lse = call(fused.liger_fwd, x)
            fused.liger_bwd(*(x[n] for n in ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "pos", "h0")),
                            lse, torch.randn_like(o), torch.randn_like(hT), 0.3, 64, 0.5, 16.0)
        qs, ks, vs, qp, kp = swa_inputs()
        o, lse = window.swa_fwd(qs, ks, vs, qp, kp, 0.5, 8, 2)
        window.swa_bwd(qs, ks, vs, qp, kp, o, lse, torch.randn_like(o), 0.5, 8, 2)

    kernels, aliased = set(), []
    for launcher, kw, written in launches:
        kernels.add(launcher.fn.__name__)
        by_ptr = {}
        for name, t in kw.items():
            if isinstance(t, torch.Tensor) and t.numel() and kw.get(f"USE_{name.upper()}", True) is not False:
                by_ptr.setdefault(t.data_ptr(), []).append(name)
        for names in by_ptr.values():
            if len(names) > 1 and set(names) & written and not set(names) & set(launcher.restore):
                aliased.append((launcher.fn.__name__, names))
    assert {"gla_kernel_scan", "gla_bwd_kernel_dqk", "swa_fwd_kernel"} <= kernels, kernels
    assert not aliased, f"in-place launches a tuner would corrupt: {sorted(set(map(str, aliased)))}"


def _recorded_gla_launches(dtype=torch.float32):
    """(launcher, kwargs, written) of every kernel launch of one GLA forward + backward (interpreter)."""
    with _record_launches() as launches:
        q, k, v, g, h = (None if x is None else x.to(dtype) for x in gla_inputs(B=1, HKV=2, G=2, T=70))
        o, hT = chunk.chunk_gla_fwd(q, k, v, g, h.float())
        chunk.chunk_gla_bwd(q, k, v, g, h.float(), torch.randn_like(o), torch.randn_like(hT))
    return launches


def test_tuned_table_round_trip(monkeypatch, tmp_path):
    """benchmarks/tune_kernels.py's chain without the GPU tuner: the tuner's picks (set by hand on the launchers, keyed
    by real launches' kwargs) -> collect() -> JSON -> load_table() -> _Launcher.config() returns the pick for the same
    launch and the kernel's default for a launch with other dtypes; a table from another card or Triton version is
    ignored; CPU tensors never look a table up."""
    import json
    import sys

    import triton

    from ligerfx.kernels import utils

    monkeypatch.setenv("LIGERFX_AUTOTUNE", "0")  # the script sets it to 1 at import; restored after the test
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    sys.modules.pop("tune_kernels", None)
    import tune_kernels

    launches = _recorded_gla_launches()
    assert len(launches) >= 6
    for launcher in utils.LAUNCHERS.values():
        monkeypatch.setattr(launcher, "picks", {})
    picked = {}
    for i, (launcher, kw, _) in enumerate(launches):
        cfg = triton.Config({}, num_warps=2 ** (i % 3), num_stages=1 + i % 4)
        launcher.picks[launcher.launch_key(kw)] = (cfg, launcher.default(kw))
        picked[(launcher.name, launcher.launch_key(kw))] = (cfg.num_warps, cfg.num_stages)
    data = {"card": "Test Card", "triton": triton.__version__, "kernels": tune_kernels.collect()}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))

    table = utils.load_table(str(path), "Test Card", triton.__version__)
    for launcher, kw, _ in launches:
        cfg = launcher.config(kw, table)
        assert (cfg.num_warps, cfg.num_stages) == picked[(launcher.name, launcher.launch_key(kw))], launcher.name
    # fp16 inputs: kernels that see fp16 tensors have other launch keys -> their defaults (the fp32-only ones, e.g.
    # the state scans, keep the same key and the pick)
    n_default = 0
    for launcher, kw, _ in _recorded_gla_launches(torch.float16):
        cfg, default = launcher.config(kw, table), launcher.default(kw)
        want = picked.get((launcher.name, launcher.launch_key(kw)), (default.num_warps, default.num_stages))
        assert (cfg.num_warps, cfg.num_stages) == want, launcher.name
        n_default += (launcher.name, launcher.launch_key(kw)) not in picked
    assert n_default >= 4
    assert utils.load_table(str(path), "Other Card", triton.__version__) is None
    for bad, text in ((tmp_path / "missing.json", None), (tmp_path / "bad.json", "{not json"),
                      (tmp_path / "nokernels.json", json.dumps({"card": "Test Card", "triton": triton.__version__}))):
        if text is not None:
            bad.write_text(text)
        with pytest.raises(ValueError, match=bad.name):
            utils.load_table(str(bad), "Test Card", triton.__version__)
    assert utils.load_table(str(path), "Test Card", "0.0.0") is None
    assert utils.tuned_table(torch.device("cpu")) is None
    # merging keeps old picks of other keys and lets new picks win
    old = {"gla_kernel_scan": [{"key": [1], "num_warps": 2, "num_stages": 1},
                               {"key": [2], "num_warps": 2, "num_stages": 1}]}
    new = {"gla_kernel_scan": [{"key": [2], "num_warps": 8, "num_stages": 3}]}
    merged = {tuple(e["key"]): e["num_warps"] for e in tune_kernels.merge(old, new)["gla_kernel_scan"]}
    assert merged == {(1,): 2, (2,): 8}
