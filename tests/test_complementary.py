"""``variant="complementary"``: window (+ sinks) softmax over the recent tokens, GLA only over the tokens that left
the window, one shared normaliser (``ligerfx/liger.py::complementary_branch``).

Checked against ``reference.complementary64`` (float64, every query's weights written out, no shared code): the
uncached forward (odd lengths, left padding, GQA, sinks, the reference kernels and the Triton kernels under the CPU
interpreter), its gradients, a cache fed by prefill + decode steps and by chunks with padding (outputs equal the
uncached forward, the state holds exactly the tokens that left the ring), and a tiny transformed model whose
``generate()`` equals greedy decoding by full forwards. A sequence the window + sinks see whole is attended
exactly as by softmax attention.
"""
import pytest
import torch
import torch.nn.functional as F

import ligerfx
from ligerfx import liger
from ligerfx.cache import LigerLayer
from ligerfx.config import LigerConfig
from models import assert_generate_is_greedy_full_forward, tiny
from reference import complementary64, rel

SCALE = 0.3


def inputs(B, HKV, G, T, K, V, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    # peaky features (x3) so that tokens beyond the window carry visible weight
    return dict(q_pre=r(B, HKV * G, T, K) * 3, k_pre=r(B, HKV, T, K) * 3, v=r(B, HKV, T, V),
                gate_src=r(B, HKV, T, K) + 2, q_rope=r(B, HKV * G, T, K), k_rope=r(B, HKV, T, K))


def positions_of(valid):
    return (valid.long().cumsum(1) - 1).masked_fill(~valid, -1)


def run(x, cfg, valid=None, cache=None):
    return liger.liger_attention(*x.values(), scale=SCALE, cfg=cfg, valid=valid, cache=cache)


def reference(x, cfg, valid):
    B, T = x["v"].shape[0], x["v"].shape[2]
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    return complementary64(*x.values(), positions_of(valid), SCALE, cfg.window, cfg.n_sinks, cfg.gate_normalizer)


def left_pad(B, T, pads):
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return valid


def new_layer(cfg):
    return LigerLayer(cfg.window, cfg.n_sinks, complementary=True)


@pytest.mark.parametrize("T,W,S,G,pads", [(37, 4, 0, 2, None), (37, 4, 2, 2, None), (23, 5, 4, 1, (0, 7)),
                                          (9, 4, 2, 2, (3, 0)), (70, 16, 4, 2, (5, 0))])
def test_forward_matches_float64(T, W, S, G, pads):
    cfg = LigerConfig(variant="complementary", window=W, sinks=S, gate_normalizer=4.0)
    x = inputs(2, 2, G, T, 8, 6)
    valid = left_pad(2, T, pads) if pads else None
    o = run(x, cfg, valid)
    ref = reference(x, cfg, valid)
    m = (valid if valid is not None else torch.ones(2, T, dtype=torch.bool))[:, None, :, None]
    assert rel(o * m, ref * m) < 1e-5
    # the state part is not negligible in these cases (else the test could not tell the variant from swa_sinks)
    swa = liger.liger_attention(*x.values(), scale=SCALE, cfg=LigerConfig(variant="swa_sinks", window=W, sinks=S),
                                valid=valid)
    if T > W + S + 1:
        assert rel(o * m, swa * m) > 1e-2


def test_triton_kernels_match_float64():
    from ligerfx.kernels import triton_impls
    cfg = LigerConfig(variant="complementary", window=4, sinks=2, gate_normalizer=4.0)
    x = inputs(2, 2, 2, 41, 16, 16)
    valid = left_pad(2, 41, (0, 6))
    with triton_impls.on_cpu():
        o = run(x, cfg, valid)
    m = valid[:, None, :, None]
    assert rel(o * m, reference(x, cfg, valid) * m) < 1e-4


def test_whole_sequence_in_window_is_softmax_attention():
    """T <= window + 1: nothing has left the window, so the output is causal softmax attention (the teacher)."""
    cfg = LigerConfig(variant="complementary", window=16, sinks=4)
    x = inputs(1, 2, 2, 17, 8, 8)
    o = run(x, cfg)
    k, v = (x[n].repeat_interleave(2, 1) for n in ("k_rope", "v"))
    ref = F.scaled_dot_product_attention(x["q_rope"].double(), k.double(), v.double(), is_causal=True, scale=SCALE)
    assert rel(o, ref) < 1e-6


@pytest.mark.parametrize("T", [1, 7, 8, 9, 10])
@pytest.mark.parametrize("pads", [None, (0, 3)])
def test_short_calls_skip_the_state_and_sinks_exactly(T, pads, monkeypatch):
    """``liger.fits_window``: a call with no cache and T <= window + 1 (here 9) takes the window kernel alone. Across
    that boundary, with sinks and left padding, the output equals the float64 reference and, bit for bit, the
    general path (the shortcut switched off); gradients of the window inputs agree too."""
    W = 8
    cfg = LigerConfig(variant="complementary", window=W, sinks=2, gate_normalizer=4.0)
    assert liger.fits_window(T, cfg, None) == (T <= W + 1) and not liger.fits_window(T, cfg, new_layer(cfg))
    x = inputs(2, 2, 2, T, 8, 6, seed=T)
    valid = left_pad(2, T, pads) if pads and T > 3 else None
    m = (valid if valid is not None else torch.ones(2, T, dtype=torch.bool))[:, None, :, None]
    xs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o = run(xs, cfg, valid)
    assert rel(o * m, reference(x, cfg, valid) * m) < 1e-5
    w = torch.randn(o.shape) * m
    (o * w).sum().backward()
    monkeypatch.setattr(liger, "fits_window", lambda *a: False)
    xg = {n: t.clone().requires_grad_() for n, t in x.items()}
    o_general = run(xg, cfg, valid)
    assert torch.equal(o * m, o_general * m)
    (o_general * w).sum().backward()
    for n in ("q_rope", "k_rope", "v"):
        assert torch.allclose(xs[n].grad, xg[n].grad, atol=1e-6), n


@pytest.mark.parametrize("variant", ["gla", "swa_sinks"])
@pytest.mark.parametrize("T", [8, 9, 10])
def test_short_calls_other_variants_equal_the_general_path(variant, T, monkeypatch):
    """The same shortcut for ``gla`` (sinks on) and ``swa_sinks``, with the sink query given (``sink_position`` 3,
    inside the short sequence: a query past it would score sinks outside its window from there, but none is
    outside): bit for bit the general path through ``sink_attention``."""
    cfg = LigerConfig(variant=variant, window=8, sinks=2, gate_normalizer=4.0)
    x = inputs(2, 2, 2, T, 8, 6, seed=T)
    q_sink = torch.randn(x["q_rope"].shape, generator=torch.Generator().manual_seed(1))
    kw = dict(scale=SCALE, cfg=cfg, q_sink=q_sink, sink_position=3)
    o = liger.liger_attention(*x.values(), **kw)
    monkeypatch.setattr(liger, "fits_window", lambda *a: False)
    o_general = liger.liger_attention(*x.values(), **kw)
    assert torch.equal(o, o_general)  # T = 10: both the general path (the sinks count for the last query)


def test_gradients_match_float64():
    cfg = LigerConfig(variant="complementary", window=3, sinks=1, gate_normalizer=4.0)
    x = inputs(1, 1, 2, 19, 8, 4, seed=3)
    valid = torch.ones(1, 19, dtype=torch.bool)
    valid[0, :2] = False
    x32 = {n: t.clone().requires_grad_() for n, t in x.items()}
    x64 = {n: t.double().clone().requires_grad_() for n, t in x.items()}
    w = torch.randn(1, 2, 19, 4, dtype=torch.float64) * valid[:, None, :, None]
    (run(x32, cfg, valid).double() * w).sum().backward()
    (reference(x64, cfg, valid) * w).sum().backward()
    for n in x:
        assert rel(x32[n].grad, x64[n].grad) < 1e-4, n


@pytest.mark.parametrize("split", [[13] + [1] * 24, [1] * 37, [10, 9, 1, 1, 16], [40, 1, 1]])
def test_cache_steps_equal_uncached_forward(split):
    """Prefill + decode steps / chunks (a padded row included) give the uncached outputs, and after each call the
    state is exactly the GLA state of the tokens that left the ring (sinks excluded)."""
    cfg = LigerConfig(variant="complementary", window=5, sinks=2, gate_normalizer=4.0)
    T = sum(split)
    x = inputs(2, 2, 2, T, 8, 6, seed=1)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding in the first call of row 1
    valid[1, 13] = False  # and one padded token later on
    full = run(x, cfg, valid)
    layer, outs, t0 = new_layer(cfg), [], 0
    with torch.no_grad():
        for n in split:
            part = {k: v[:, :, t0:t0 + n] for k, v in x.items()}
            outs.append(run(part, cfg, valid[:, t0:t0 + n], cache=layer))
            t0 += n
            # state = sum over tokens that left the ring: valid, position >= sinks and <= seen - window - 1
            pos = positions_of(valid[:, :t0])
            seen = valid[:, :t0].sum(1)
            for b in range(2):
                keep = [j for j in range(t0) if cfg.n_sinks <= int(pos[b, j]) <= int(seen[b]) - cfg.window - 1]
                S = torch.zeros(2, 8, 7, dtype=torch.float64)
                ok = valid[b, :t0]
                lg = F.logsigmoid(x["gate_src"][b, :, :t0].double()) / cfg.gate_normalizer
                for j in keep:
                    later = [i for i in range(j + 1, t0) if ok[i] and int(pos[b, i]) <= int(seen[b]) - cfg.window - 1]
                    d = lg[:, later].sum(1).exp() if later else torch.ones(2, 8, dtype=torch.float64)
                    kv = torch.cat([x["v"][b, :, j].double(), torch.ones(2, 1, dtype=torch.float64)], -1)
                    S += (d * x["k_pre"][b, :, j].double().softmax(-1))[:, :, None] * kv[:, None, :]
                if keep:
                    assert rel(layer.state[b], S) < 1e-5
                else:
                    assert layer.state is None or layer.state[b].abs().max() == 0
    o = torch.cat(outs, 2)
    m = valid[:, None, :, None]
    assert rel(o * m, full * m) < 1e-5


def test_config_rejects_mix():
    with pytest.raises(ValueError, match="complementary"):
        LigerConfig(variant="complementary", mix=0.7)
    assert LigerConfig(variant="complementary").n_sinks == 4


def test_tiny_model_generate_equals_full_forward_greedy():
    """A transformed tiny Llama: the cached generate() path (prefill + complementary decode steps, left padding)
    picks the same tokens as greedy decoding by uncached full forwards, and the logits agree."""
    torch.manual_seed(0)
    model = tiny("llama")
    lin = ligerfx.transform(model, config=LigerConfig(variant="complementary", window=4, sinks=2))
    ids = torch.randint(3, 100, (2, 11))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    assert_generate_is_greedy_full_forward(lin, ids, mask, 12)
