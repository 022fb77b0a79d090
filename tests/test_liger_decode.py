"""The fused decode step (``ligerfx::liger_decode_``): its naive twin against the branch-by-branch path of
``ligerfx/liger.py`` (``cache.window_keys`` + ``ops.swa_fwd`` + ``ops.gla_fwd`` + ``cache.advance``) over many
steps, the Triton kernel (CPU interpreter, fp32 and fp16) against the naive twin, buffers included, and opcheck.

The step sequences cross every ring regime: a fresh cache, ``seen`` below and above the window (the slot written
holds the oldest visible token), the sink slots filling, and a row that gets padding tokens in the middle.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from ligerfx import liger
from ligerfx.cache import LigerLayer
from ligerfx.config import LigerConfig
from ligerfx.kernels.liger import naive
from models import left_padded, tiny
from reference import rel

W = 8
BUFFERS = ("state", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos", "seen", "length", "win_kp", "win_gs")
CONFIGS = {
    "gla": dict(window=W),
    "gla_sinks": dict(window=W, sinks=4),
    "swa_sinks": dict(window=W, variant="swa_sinks"),  # no recurrent branch, 4 sinks
    "pure_gla": dict(window=W, mix=1.0),  # no window branch, no ring
    "complementary": dict(window=W, variant="complementary", gate_normalizer=4.0),  # 4 sinks, state of V + 1
}


def step_inputs(B, HKV, G, T, K, V, dtype=torch.float32):
    return dict(q_pre=torch.randn(B, HKV * G, T, K, dtype=dtype) * 2,
                k_pre=torch.randn(B, HKV, T, K, dtype=dtype) * 2, v=torch.randn(B, HKV, T, V, dtype=dtype),
                gate_src=torch.randn(B, HKV, T, K, dtype=dtype), q_rope=torch.randn(B, HKV * G, T, K, dtype=dtype),
                k_rope=torch.randn(B, HKV, T, K, dtype=dtype))


def attend(cfg, layer, x, valid, fused: bool, monkeypatch):
    monkeypatch.setattr(liger, "FUSED_DECODE", fused)
    with torch.no_grad():
        return liger.liger_attention(*x.values(), scale=0.3, cfg=cfg, valid=valid, cache=layer)


def new_layer(cfg):
    if cfg.variant == "complementary":
        return LigerLayer(cfg.window, cfg.n_sinks, complementary=True)
    return LigerLayer(cfg.window, cfg.n_sinks, recurrent=cfg.recurrent_weight > 0, windowed=cfg.recurrent_weight < 1)


def assert_same_layer(a: LigerLayer, b: LigerLayer, tol=1e-5):
    for name in BUFFERS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if x.is_floating_point():
            assert rel(x, y) < tol, name
        else:
            assert torch.equal(x, y), name
    assert a._fresh == b._fresh and a.cumulative_length == b.cumulative_length


@pytest.mark.parametrize("prefill", [0, 3, 11])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_naive_decode_equals_branch_by_branch_path(cfg, G, prefill, monkeypatch):
    """Two caches fed the same prefill and 14 decode steps, one through the fused op (naive twin: the CPU default),
    one through the old path: same outputs, same buffers and counters after every step. Row 1 gets padding tokens
    in the middle (steps 2, 5, 6); the states are randomised after the prefill. For ``complementary`` the old path
    is ``complementary_branch`` on the cache (equal to the float64 reference in ``test_complementary.py``); with
    prefill 11 the ring (8) is full, so tokens leave it for the state from the first step."""
    cfg = LigerConfig(**CONFIGS[cfg])
    B, HKV, K, V = 3, 2, 12, 10
    old, new = new_layer(cfg), new_layer(cfg)
    if prefill:
        x = step_inputs(B, HKV, G, prefill, K, V)
        valid = torch.ones(B, prefill, dtype=torch.bool)
        valid[2, :2] = False  # a left-padded row
        for layer in (old, new):
            attend(cfg, layer, x, valid, False, monkeypatch)
        if old.state is not None:
            # a complementary state's weights (phi >= 0) and normaliser column are non-negative
            old.state.normal_() if cfg.variant != "complementary" else old.state.uniform_(0.0, 2.0)
            new.state.copy_(old.state)
    for step in range(14):
        x = step_inputs(B, HKV, G, 1, K, V)
        valid = None
        if step in (2, 5, 6):
            valid = torch.ones(B, 1, dtype=torch.bool)
            valid[1] = False
        o_old = attend(cfg, old, x, valid, False, monkeypatch)
        o_new = attend(cfg, new, x, valid, True, monkeypatch)
        assert o_new.shape == o_old.shape and o_new.dtype == o_old.dtype
        assert rel(o_new, o_old) < 1e-5, step
        assert_same_layer(new, old)
    assert new.seen.tolist() == [prefill + 14, prefill + 11, max(prefill - 2, 0) + 14]


def test_fused_op_is_what_decode_runs(monkeypatch):
    """Decode steps of a linearized model call the fused op once per layer; a prefill, autograd or
    ``FUSED_DECODE = False`` (``LIGERFX_FUSED_DECODE=0``) take the branch-by-branch path."""
    calls = []
    op = liger.ops.liger_decode_
    monkeypatch.setattr(liger.ops, "liger_decode_", lambda *a: calls.append(1) or op(*a))
    model = ligerfx.transform(tiny("llama"), config=LigerConfig(window=W, sinks=1))
    ids, mask, _ = left_padded(T=10, pad=(0, 3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert len(calls) == 5 * 2  # 5 decode steps x 2 layers
    monkeypatch.setattr(liger, "FUSED_DECODE", False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert len(calls) == 10 and torch.equal(out, ref)
    monkeypatch.setattr(liger, "FUSED_DECODE", True)
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, cache=cache, use_cache=True)
    model(ids[:, :1], cache=cache, use_cache=True)  # grad enabled: old path
    assert len(calls) == 10


def test_env_knob_is_read_at_import():
    import subprocess
    import sys
    code = "import ligerfx.liger as l; print(l.FUSED_DECODE)"
    env = dict(os.environ, LIGERFX_FUSED_DECODE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------- op-level inputs
NAMES = ("q_pre", "k_pre", "v", "gate_src", "q_rope", "k_rope", "pos", "state", "win_k", "win_v", "win_pos",
         "sink_k", "sink_v", "sink_pos")
MUTATED = ("state", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos")
COMP_MUTATED = MUTATED + ("win_kp", "win_gs")  # the complementary ring's extra buffers


def op_inputs(B=3, HKV=2, G=2, K=16, V=16, W=W, S=4, seen=(3, 13, 0), pad=(False, False, True), recurrent=True,
              dtype=torch.float32, strided=False):
    """One step's inputs on random buffers: ring positions as a cache holds them after ``seen`` tokens (the
    latest token p < seen with p % W == slot), sink slot s holding token s once seen > s; row 2 is padding."""
    x = step_inputs(B, HKV, G, 1, K, V, dtype)
    if strided:  # heads not outermost, as the permuted projections the pass hands over
        x = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in x.items()}
    seen = torch.tensor(seen)
    x["pos"] = seen.masked_fill(torch.tensor(pad), -1)[:, None]
    x["state"] = torch.randn(B, HKV, K, V) if recurrent else None
    x.update(win_k=None, win_v=None, win_pos=None, sink_k=None, sink_v=None, sink_pos=None)
    if W:
        last = seen[:, None] - 1
        held = last - torch.remainder(last - torch.arange(W), W)
        x.update(win_k=torch.randn(B, HKV, W, K, dtype=dtype), win_v=torch.randn(B, HKV, W, V, dtype=dtype),
                 win_pos=held.masked_fill(held < 0, -1))
    if S:
        sp = torch.arange(S).expand(B, S)
        x.update(sink_k=torch.randn(B, HKV, S, K, dtype=dtype), sink_v=torch.randn(B, HKV, S, V, dtype=dtype),
                 sink_pos=sp.masked_fill(sp >= seen[:, None], -1))
    return x


def call(fn, x, mix=0.5, window=W, norm=16.0):
    """One step of ``fn`` on copies of ``x``'s buffers; complementary inputs (``comp_inputs``) pass their ring."""
    y = {n: None if t is None else t.clone() for n, t in x.items()}
    ring = {n: y[n] for n in ("win_kp", "win_gs") if n in y}
    o = fn(*(y[n] for n in NAMES), 0.3, window, mix, norm, **ring)
    return o, y


def test_naive_decode_padding_row_changes_nothing():
    x = op_inputs()
    o, y = call(naive.liger_decode, x)
    for n in MUTATED:
        assert torch.equal(y[n][2], x[n][2]), n  # row 2 is padding
        assert not torch.equal(y[n][0], x[n][0]), n  # row 0 (pos 3 < 4 sinks) writes every buffer
    assert not torch.isnan(o).any()


def test_opcheck():
    x = op_inputs()
    torch.library.opcheck(torch.ops.ligerfx.liger_decode_.default,
                          (*(x[n] for n in NAMES), None, None, 0.3, W, 0.5, 16.0))
    x = op_inputs(recurrent=False, S=0)
    torch.library.opcheck(torch.ops.ligerfx.liger_decode_.default,
                          (*(x[n] for n in NAMES), None, None, 0.3, W, 0.0, 16.0))
    x, q_sink = _sink_query_inputs()
    torch.library.opcheck(torch.ops.ligerfx.liger_decode_.default,
                          (*(x[n] for n in NAMES), None, None, 0.3, 4, 0.5, 16.0, q_sink))


# ------------------------------------------------------------------------------------------- Triton interpreter
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def check_kernel(x, mix=0.5, window=W, norm=16.0):
    from ligerfx.kernels.liger import decode
    mutated = [n for n in COMP_MUTATED if n in x]
    o, y = call(decode.liger_decode, x, mix, window, norm)
    x32 = {n: t.float() if t is not None and t.is_floating_point() and n not in mutated else t for n, t in x.items()}
    o_ref, y_ref = call(naive.liger_decode, x32, mix, window, norm)
    tol = 1e-5 if x["v"].dtype == torch.float32 else 2e-3
    assert o.dtype == x["v"].dtype and o.shape == o_ref.shape
    assert rel(o, o_ref) < tol
    for n in mutated:
        if y[n] is None:
            continue
        if n == "state":
            assert rel(y[n], y_ref[n]) < 1e-5
        else:  # copies of the token (in the buffers' dtype) or positions: exact
            assert torch.equal(y[n], y_ref[n]), n


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G,K,V,S", [(1, 16, 16, 0), (2, 32, 32, 4), (4, 16, 32, 1), (2, 12, 20, 4)])
def test_triton_decode_matches_naive(G, K, V, S, dtype):
    check_kernel(op_inputs(G=G, K=K, V=V, S=S, dtype=dtype))


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("case", ["swa_sinks", "pure_gla", "no_ring", "strided", "window_beyond_ring"])
def test_triton_decode_variants(case):
    if case == "swa_sinks":
        check_kernel(op_inputs(recurrent=False), mix=0.0)
    elif case == "pure_gla":
        check_kernel(op_inputs(W=0, S=0), mix=1.0)
    elif case == "no_ring":  # window 0: the window branch sees the sinks and the token itself
        check_kernel(op_inputs(W=0, S=2), window=0)
    elif case == "strided":
        check_kernel(op_inputs(strided=True, G=4))
    else:  # visibility by position, not by slot: a window narrower than the ring hides its oldest slots
        check_kernel(op_inputs(seen=(20, 13, 9), pad=(False, False, False)), window=3)


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("cfg", ["gla_sinks", "swa_sinks", "complementary"])
def test_triton_decode_steps_equal_naive_steps(cfg, monkeypatch):
    """12 steps through ``liger_attention``: the Triton kernel (interpreter) and the naive twin keep the same
    cache (the writes of step t are the reads of step t + 1)."""
    from ligerfx.kernels import triton_impls
    cfg = LigerConfig(**CONFIGS[cfg])
    a, b = new_layer(cfg), new_layer(cfg)
    for step in range(12):
        x = step_inputs(2, 2, 2, 1, 16, 16)
        valid = torch.tensor([[True], [step % 5 != 2]])
        o_ref = attend(cfg, a, x, valid, True, monkeypatch)
        with triton_impls.on_cpu():
            o = attend(cfg, b, x, valid, True, monkeypatch)
        assert rel(o, o_ref) < 1e-5, step
        assert_same_layer(b, a)


SYNC_OPS = ("aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


@pytest.mark.parametrize("arch,attn,variant", [("llama", "sdpa", "gla"), ("llama", "eager", "gla"),
                                               ("gemma3", "sdpa", "gla"), ("llama", "sdpa", "complementary")])
@pytest.mark.parametrize("fused", [True, False])
def test_decode_step_has_no_host_sync(arch, attn, variant, fused, monkeypatch):
    """A decode step's Liger layers read nothing back to the host (a sync per layer and token would stall the launch
    queue of eager GPU generation), with or without padding; the softmax teacher's own step is the comparison: any
    sync counted for the linearized model comes from HF's shared code, which both run."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    monkeypatch.setattr(liger, "FUSED_DECODE", fused)

    def syncs(model, pad):
        ids, mask, _ = left_padded(T=12, pad=pad)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(ids[:, -1:], attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        return sum(e.name in SYNC_OPS for e in prof.events())

    teacher = tiny(arch, attn)
    base = {pad: syncs(teacher, pad) for pad in ((0, 0), (0, 3))}
    model = ligerfx.transform(teacher, config=LigerConfig(window=W, variant=variant))
    for pad, n in base.items():
        assert syncs(model, pad) <= n, (pad, n)


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("HKV,G,K,S,seen", [(1, 4, 256, 4, (70, 2)),    # Gemma-3-270M: 4 query heads on 1 KV head
                                           (2, 4, 64, 0, (200, 64)),    # Llama-3.2-1B head dim, GQA 4
                                           (2, 2, 128, 4, (65, 3))])
def test_triton_decode_model_shapes(HKV, G, K, S, seen):
    """Real head dims and the real ring (window 64): full register tiles of K = 256, ring wrap, sinks filling."""
    check_kernel(op_inputs(B=2, HKV=HKV, G=G, K=K, V=K, W=64, S=S, seen=seen, pad=(False, False)), window=64)


def _sink_query_inputs(dtype=torch.float32):
    x = op_inputs(W=4, S=3, seen=(40, 13, 2), pad=(False, False, False), dtype=dtype)  # sinks left the window
    g = torch.Generator().manual_seed(7)
    q_sink = (torch.randn(x["q_rope"].shape, generator=g) * 2).to(dtype)
    return x, q_sink


def test_naive_decode_sink_query_scores_only_the_sink_slots():
    """``q_sink`` replaces q_rope for the sink slots only: passing q_rope itself changes nothing, another query
    changes the output of the rows that have sinks, and the buffer writes never depend on it."""
    x, q_sink = _sink_query_inputs()
    args = lambda y: [y[n] for n in NAMES] + [0.3, 4, 0.5, 16.0]  # noqa: E731
    y0, y1, y2 = ({n: None if t is None else t.clone() for n, t in x.items()} for _ in range(3))
    o0 = naive.liger_decode(*args(y0))
    o1 = naive.liger_decode(*args(y1), q_sink=x["q_rope"].clone())
    o2 = naive.liger_decode(*args(y2), q_sink=q_sink)
    assert torch.equal(o0, o1)
    assert (o2[:2] - o0[:2]).abs().max() > 1e-3  # rows 0, 1 hold sinks
    for n in MUTATED:
        assert torch.equal(y0[n], y2[n]), n


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_sink_query_matches_naive(dtype):
    from ligerfx.kernels.liger import decode
    x, q_sink = _sink_query_inputs(dtype)
    outs = []
    for fn in (decode.liger_decode, naive.liger_decode):
        y = {n: None if t is None else t.clone() for n, t in x.items()}
        outs.append((fn(*(y[n] for n in NAMES), 0.3, 4, 0.5, 16.0, q_sink), y))
    (o, y), (o_ref, y_ref) = outs
    assert rel(o, o_ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    for n in MUTATED:
        if n == "state":
            assert rel(y[n], y_ref[n]) < 1e-5
        else:
            assert torch.equal(y[n], y_ref[n]), n


# ------------------------------------------------------------------------------------- complementary (op level)
def comp_inputs(B=3, HKV=2, G=2, K=16, V=16, W=W, S=4, seen=(3, 13, 0), pad=(False, False, True),
                dtype=torch.float32):
    """``op_inputs`` plus the complementary ring (pre-RoPE keys, gate inputs) and a state of V + 1 columns with a
    non-negative normaliser column."""
    x = op_inputs(B, HKV, G, K, V, W, S, seen, pad, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    x["state"] = torch.rand(B, HKV, K, V + 1, generator=gen) * 2
    x["win_kp"] = (torch.randn(B, HKV, W, K, generator=gen) * 2).to(dtype)
    x["win_gs"] = (torch.randn(B, HKV, W, K, generator=gen) + 1).to(dtype)
    return x




def test_naive_complementary_step_equals_float64_by_hand():
    """The op's complementary step, written out per row in float64 without the op's vectorisation: read the state
    decayed by every occupied ring slot's gate and the token's own, share the window's normaliser, push the ring's
    oldest token (slot pos % W) into the state unless it is empty or a sink; a padded row keeps its state. Rows:
    0 has seen 3 tokens (ring not full: nothing leaves), 1 has seen 13 (slot 5 holds position 5, a non-sink, which
    leaves), 2 is padding."""
    x = comp_inputs(seen=(3, 13, 0))
    o, y = call(naive.liger_decode, x, norm=4.0)
    d = {n: None if t is None else (t.double() if t.is_floating_point() else t) for n, t in x.items()}
    lg = lambda t: F.logsigmoid(t) / 4.0  # noqa: E731
    K, V = 16, 16
    for b in range(2):  # the valid rows
        p = int(d["pos"][b, 0])
        for h in range(2):
            S0 = d["state"][b, h]
            occupied = [j for j in range(W) if d["win_pos"][b, j] >= 0]
            g = sum((lg(d["win_gs"][b, h, j]) for j in occupied), torch.zeros(K, dtype=torch.float64))
            g = g + lg(d["gate_src"][b, h, 0])
            read = S0 * g.exp()[:, None]
            # window softmax over the sinks held (positions < 4 and < p), the ring's non-sink tokens, the token
            keys, vals = [], []
            for s in range(4):
                if 0 <= int(d["sink_pos"][b, s]) <= p:
                    keys.append(d["sink_k"][b, h, s]), vals.append(d["sink_v"][b, h, s])
            for j in occupied:
                if int(d["win_pos"][b, j]) >= 4:
                    keys.append(d["win_k"][b, h, j]), vals.append(d["win_v"][b, h, j])
            keys.append(d["k_rope"][b, h, 0]), vals.append(d["v"][b, h, 0])
            Kt, Vt = torch.stack(keys), torch.stack(vals)
            for gq in range(2):
                hq = h * 2 + gq
                w = torch.softmax(Kt @ d["q_rope"][b, hq, 0] * 0.3, 0)
                r = torch.softmax(d["q_pre"][b, hq, 0], 0) @ read
                ref = (w @ Vt + r[:V]) / (1 + r[V])
                assert rel(o[b, hq, 0], ref) < 1e-5, (b, hq)
            slot = p % W
            old = int(d["win_pos"][b, slot])
            S1 = S0.clone()
            if old >= 0:
                S1 = S0 * lg(d["win_gs"][b, h, slot]).exp()[:, None]
                if old >= 4:
                    v1 = torch.cat([d["win_v"][b, h, slot], torch.ones(1, dtype=torch.float64)])
                    S1 = S1 + torch.softmax(d["win_kp"][b, h, slot], 0)[:, None] * v1[None, :]
            assert rel(y["state"][b, h], S1) < 1e-6, (b, h)
        assert torch.equal(y["win_kp"][b, :, p % W], x["k_pre"][b, :, 0])
        assert torch.equal(y["win_gs"][b, :, p % W], x["gate_src"][b, :, 0])
    assert int(x["win_pos"][1, 13 % W]) == 5  # row 1 pushed a real token
    for n in COMP_MUTATED:
        assert torch.equal(y[n][2], x[n][2]), n  # padding changes nothing


def test_opcheck_complementary():
    x = comp_inputs()
    torch.library.opcheck(torch.ops.ligerfx.liger_decode_.default,
                          (*(x[n] for n in NAMES), x["win_kp"], x["win_gs"], 0.3, W, 0.5, 4.0))


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G,K,V,S,seen", [(2, 16, 16, 4, (3, 13, 0)), (1, 16, 32, 0, (8, 20, 9)),
                                         (4, 12, 20, 2, (9, 2, 30))])
def test_triton_complementary_decode_matches_naive(G, K, V, S, seen, dtype):
    check_kernel(comp_inputs(G=G, K=K, V=V, S=S, seen=seen, dtype=dtype), norm=4.0)


@interpreter
@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("HKV,G,K,seen", [(1, 4, 256, (70, 2)), (2, 4, 64, (200, 64))])
def test_triton_complementary_decode_model_shapes(HKV, G, K, seen):
    """Gemma-3-270M (K = 256, 1 KV head) and Llama-3.2-1B head shapes with the real ring of 64."""
    check_kernel(comp_inputs(B=2, HKV=HKV, G=G, K=K, V=K, W=64, S=4, seen=seen, pad=(False, False)), window=64,
                 norm=4.0)


def test_complementary_rejects_missing_ring():
    x = comp_inputs()
    with pytest.raises(ValueError, match="complementary"):
        naive.liger_decode(*(x[n] for n in NAMES[:8]), None, None, None, x["sink_k"], x["sink_v"], x["sink_pos"],
                           0.3, W, 0.5, 4.0, None, x["win_kp"], x["win_gs"])
