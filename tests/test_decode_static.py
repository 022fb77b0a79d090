"""Static-size, in-place decode state (``ligerfx.cache.LigerLayer``): prefill + decode == full forward for any
schedule, fixed buffer addresses, and compiled generation = one prefill graph + one decode graph."""
import pytest
import torch
import torch._dynamo
from transformers import DynamicCache

import ligerfx
from ligerfx.backend import make_backend
from ligerfx.cache import LigerLayer, cache_nbytes, new_cache
from models import left_padded, tiny

W = 8
CONFIGS = {
    "gla": ligerfx.LigerConfig(window=W),
    "swa_sinks": ligerfx.LigerConfig(variant="swa_sinks", window=W),
    "gla_sinks": ligerfx.LigerConfig(window=W, sinks=2),
    "pure_gla": ligerfx.LigerConfig(window=W, mix=1.0),
    "complementary": ligerfx.LigerConfig(variant="complementary", window=W, sinks=2),
}
# chunk sizes fed through one cache (1 = a decode step); the batch has 6 left-padding tokens in row 1
SCHEDULES = {
    "short_prefill": [3] + [1] * 33,  # row 1's padding arrives as single padded decode tokens
    "long_prefill": [20] + [1] * 16,  # prefill longer than the window: only its last W tokens are kept
    "chunks": [5, 13, 1, 1, 9, 2] + [1] * 5,  # chunks longer than the window onto a partly / fully filled ring
    "token_by_token": [1] * 36,
}


def fed_in_chunks(model, ids, mask, pos, sizes, cache=None):
    """Logits of ``ids`` fed in chunks of ``sizes`` through one cache (each call sees the 2-D mask so far)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    outs, s = [], 0
    with torch.no_grad():
        for n in sizes:
            outs.append(model(ids[:, s:s + n], attention_mask=mask[:, :s + n], position_ids=pos[:, s:s + n],
                              cache=cache, use_cache=True).logits)
            s += n
    assert s == ids.shape[1]
    return torch.cat(outs, 1), cache


def max_err_on_valid(a, b, mask):
    return (a - b)[mask.bool()[..., None].expand_as(a)].abs().max().item()


def buffers(cache):
    return {(i, name): (id(t), t.data_ptr()) for i, layer in enumerate(cache.layers) if isinstance(layer, LigerLayer)
            for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_chunked_and_decoded_equals_full_forward(cfg, schedule):
    model = ligerfx.transform(tiny("llama"), config=CONFIGS[cfg])
    ids, mask, pos = left_padded(T=36, pad=(0, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    inc, cache = fed_in_chunks(model, ids, mask, pos, SCHEDULES[schedule])
    assert max_err_on_valid(inc, full, mask) <= 1e-5
    layer = cache.layers[0]
    assert layer.seen.tolist() == mask.sum(1).tolist() and int(layer.length) == ids.shape[1]
    if layer.win_pos is not None:  # the ring holds exactly the last W positions of each row, one per slot p % W
        for b, n in enumerate(mask.sum(1).tolist()):
            held = layer.win_pos[b]
            assert sorted(held.tolist()) == list(range(n - W, n))
            assert all(int(p) % W == s for s, p in enumerate(held))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "mistral"])
def test_other_architectures_chunked_and_decoded(arch):
    """Gemma 3's sliding layers exercise the sliding-window mask sizes, Qwen 3 / Gemma 3 the q/k norms."""
    model = ligerfx.transform(tiny(arch), config=ligerfx.LigerConfig(window=W, sinks=1))
    ids, mask, pos = left_padded(T=36, pad=(0, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    inc, _ = fed_in_chunks(model, ids, mask, pos, SCHEDULES["chunks"])
    assert max_err_on_valid(inc, full, mask) <= 1e-5


def test_window_kernel_sees_keys_oldest_first(monkeypatch):
    """The ring is read oldest-first: the window kernels skip key blocks by position range and document non-decreasing
    valid key positions as their precondition. Also run once through the Triton kernels (CPU interpreter)."""
    from ligerfx import liger
    from ligerfx.kernels import triton_impls

    seen_k_pos = []
    swa_fwd = liger.ops.swa_fwd

    def spy(q, k, v, q_pos, k_pos, *args):
        seen_k_pos.append(k_pos)
        return swa_fwd(q, k, v, q_pos, k_pos, *args)

    monkeypatch.setattr(liger.ops, "swa_fwd", spy)
    model = ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(window=W, sinks=2))
    ids, mask, pos = left_padded(T=36, pad=(0, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    with triton_impls.on_cpu():
        inc, _ = fed_in_chunks(model, ids, mask, pos, SCHEDULES["chunks"])
    assert max_err_on_valid(inc, full, mask) <= 1e-5
    for k_pos in seen_k_pos:
        for row in k_pos.tolist():
            valid = [p for p in row if p >= 0]
            assert valid == sorted(valid)


def test_buffers_keep_their_addresses():
    model = ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(window=W, sinks=2))
    ids, mask, pos = left_padded(T=40, pad=(0, 6))
    _, cache = fed_in_chunks(model, ids[:, :10], mask[:, :10], pos[:, :10], [10])
    before = buffers(cache)
    assert {name for _, name in before} == {"state", "seen", "length", "win_k", "win_v", "win_pos", "sink_k",
                                           "sink_v", "sink_pos"}
    nbytes = cache_nbytes(cache)
    with torch.no_grad():
        for t in range(10, 40):  # well past the window
            model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], cache=cache,
                  use_cache=True)
            assert buffers(cache) == before
        cache.reorder_cache(torch.tensor([1, 0]))
        assert buffers(cache) == before
        cache.reset()
        assert buffers(cache) == before
        assert cache.layers[0].get_seq_length() == 0 and int(cache.layers[0].win_pos.max()) == -1
    assert cache_nbytes(cache) == nbytes


def test_cache_bytes_formula():
    model = ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(window=W))
    ids, mask, _ = left_padded(T=8, pad=(0, 3))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3 * W, do_sample=False,
                             return_dict_in_generate=True)
    B, H, D, L = 2, 2, 16, 2
    per_layer = B * H * D * D * 4 + 2 * B * H * W * D * 4 + B * W * 8 + B * 8 + 8  # state, ring k/v, positions, counts
    assert cache_nbytes(out.past_key_values) == L * per_layer


def test_new_cache_allocates_up_front():
    """``new_cache`` allocates before the prefill: prefill and decode write into the same buffers, same logits."""
    model = ligerfx.transform(tiny("qwen3"), config=ligerfx.LigerConfig(window=W))
    ids, mask, pos = left_padded(T=30, pad=(0, 6))
    sizes = [12] + [1] * 18
    ref, _ = fed_in_chunks(model, ids, mask, pos, sizes)
    cache = new_cache(model, batch_size=2)
    before = buffers(cache)
    assert len(before) == 2 * 6 and cache.is_compileable
    out, cache = fed_in_chunks(model, ids, mask, pos, sizes, cache=cache)
    assert buffers(cache) == before
    assert torch.equal(out, ref)


def test_beam_search_reorders_in_place():
    model = ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(window=W))
    ids, mask, _ = left_padded(T=10, pad=(0, 3))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2 * W, num_beams=3, do_sample=False,
                             return_dict_in_generate=True)
    assert out.sequences.shape == (2, 10 + 2 * W)
    assert all(layer.state.shape[0] == 6 for layer in out.past_key_values.layers)


# ------------------------------------------------------------------------------------------------ compiled
def greedy(fn, model, ids, mask, pos, steps, strict_after=None):
    """Greedy decoding: prefill with the 2-D mask, then static decode steps (token, position ids, no mask). From
    decode step ``strict_after`` on, a recompile raises."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [fn(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]]
        p = pos[:, -1:] + 1
        for i in range(steps):
            tok = logits[-1].argmax(-1, keepdim=True)
            with torch._dynamo.config.patch(error_on_recompile=strict_after is not None and i >= strict_after):
                logits.append(fn(tok, position_ids=p, cache=cache, use_cache=True).logits[:, -1])
            p = p + 1
    return torch.stack(logits, 1), cache


def counting(backend):
    graphs = []

    def compile_counted(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs)

    return compile_counted, graphs


@pytest.mark.parametrize("backend,variant", [("ligerfx", "gla"), ("inductor", "gla"), ("inductor", "complementary")])
def test_compiled_decode_is_one_graph_and_keeps_the_state_writes(backend, variant):
    """Compiled greedy decoding (prefill + 24 steps, past the window) == eager, with exactly one prefill graph and
    one decode graph: any recompile after the first decode step raises. Dropped in-place writes (dead-code
    elimination of the state/ring updates) would make the logits and the final cache differ from eager."""
    cfg = ligerfx.LigerConfig(window=W, sinks=1, variant=variant)
    model = ligerfx.transform(tiny("llama"), config=cfg)
    ids, mask, pos = left_padded(T=12, pad=(0, 4))
    ref, ref_cache = greedy(model, model, ids, mask, pos, 24)
    torch._dynamo.reset()
    fn, graphs = counting(torch._dynamo.lookup_backend(backend))
    out, cache = greedy(torch.compile(model, backend=fn), model, ids, mask, pos, 24, strict_after=1)
    assert len(graphs) == 2  # prefill, decode
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert (out - ref).abs().max().item() <= 1e-4
    decode_inputs = [n.meta.get("example_value") for n in graphs[1].graph.nodes if n.op == "placeholder"]
    assert not any(isinstance(x, torch.SymInt) for x in decode_inputs)  # no step-dependent integer in the graph
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        for name in ("state", "win_k", "win_pos", "sink_k", "seen", "length", "win_kp", "win_gs"):
            if getattr(ref_layer, name) is not None:
                torch.testing.assert_close(getattr(layer, name), getattr(ref_layer, name), atol=1e-5, rtol=1e-5)


def test_compiled_forward_inside_generate():
    """``model.forward`` compiled under stock ``generate``: HF builds the decode mask outside the compiled forward
    (the cache is compileable), so generation is one prefill graph + one decode graph."""
    model = ligerfx.transform(tiny("gemma3"), config=ligerfx.LigerConfig(window=W))
    ids, mask, _ = left_padded(T=12, pad=(0, 4))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    torch._dynamo.reset()
    fn, graphs = counting(make_backend("aot_eager"))
    model.forward = torch.compile(model.forward, backend=fn)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, ref)
    assert len(graphs) == 2


def test_compiled_hybrid_generation_has_no_graph_breaks():
    """A hybrid (layer 1 stays softmax): the Liger layer reports the softmax layer's mask sizes, whose keys grow,
    so decoding is dynamic there (prefill, first decode, one dynamic decode graph), without graph breaks."""
    model = ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(window=W, layers=[0]))
    ids, mask, _ = left_padded(T=12, pad=(0, 4))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fn, graphs = counting(make_backend("aot_eager"))
    model.forward = torch.compile(model.forward, backend=fn)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)
    assert len(graphs) <= 3 and not torch._dynamo.utils.counters["graph_break"]
