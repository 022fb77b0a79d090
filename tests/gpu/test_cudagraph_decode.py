"""Decode steps of a ligerfx-transformed model in CUDA graphs (not run in CI).

    TRITON_INTERPRET=0 python -m pytest -q tests/gpu/test_cudagraph_decode.py

A left-padded batch is prefilled eagerly, then decoded teacher-forced (fixed random tokens) three ways through the
same kind of HF cache: eagerly (the reference), by replaying one decode step captured with ``torch.cuda.CUDAGraph``
(static token / position buffers, no mask), and by ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees).
The cache buffers must keep their addresses, the device-side counters must advance on every replay, and the logits
must equal the eager ones (fp32, same kernels: <= 1e-4).
"""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import DynamicCache  # noqa: E402

import ligerfx  # noqa: E402
from ligerfx.cache import LigerLayer  # noqa: E402
from models import left_padded, tiny  # noqa: E402

DEV = "cuda"
W = 8
STEPS = 3 * W  # well past the window
WARMUP = 3


def setup(cfg):
    model = ligerfx.transform(tiny("llama").to(DEV), config=cfg)
    ids, mask, pos = (x.to(DEV) for x in left_padded(T=12, pad=(0, 4)))
    toks = torch.randint(3, model.config.vocab_size, (2, STEPS + 1), generator=torch.Generator().manual_seed(2))
    return model, ids, mask, pos, toks.to(DEV), mask.sum(1, keepdim=True)  # next position = valid tokens so far


def prefilled(model, ids, mask, pos):
    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return cache


def step(model, cache, tok, p):
    return model(input_ids=tok, position_ids=p, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def buffers(cache):
    return {(i, name): t.data_ptr() for i, layer in enumerate(cache.layers) if isinstance(layer, LigerLayer)
            for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}


def eager_reference(model, ids, mask, pos, toks, p0):
    cache = prefilled(model, ids, mask, pos)
    return torch.stack([step(model, cache, toks[:, i:i + 1], p0 + i) for i in range(STEPS + 1)], 1), cache


@pytest.mark.parametrize("cfg", [ligerfx.LigerConfig(window=W, sinks=1),
                                 ligerfx.LigerConfig(variant="swa_sinks", window=W)], ids=["gla_sinks", "swa_sinks"])
@torch.no_grad()
def test_decode_step_captured_in_a_cuda_graph(cfg):
    model, ids, mask, pos, toks, p0 = setup(cfg)
    ref, ref_cache = eager_reference(model, ids, mask, pos, toks, p0)

    cache = prefilled(model, ids, mask, pos)
    addresses = buffers(cache)
    static_tok, static_pos = toks[:, :1].clone(), p0.clone()
    logits = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: real decode steps (kernel compilation, cuBLAS workspaces)
        for i in range(WARMUP):
            static_tok.copy_(toks[:, i:i + 1])
            static_pos.copy_(p0 + i)
            logits.append(step(model, cache, static_tok, static_pos).clone())
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: the cache does not advance here
        static_out = step(model, cache, static_tok, static_pos)
    for i in range(WARMUP, STEPS):
        static_tok.copy_(toks[:, i:i + 1])
        static_pos.copy_(p0 + i)
        graph.replay()
        logits.append(static_out.clone())
    torch.cuda.synchronize()
    assert buffers(cache) == addresses
    layer = cache.layers[0]
    assert int(layer.length) == ids.shape[1] + STEPS  # the device counters advanced on every replay
    assert layer.seen.tolist() == (mask.sum(1) + STEPS).tolist()
    assert layer.cumulative_length == ids.shape[1] + STEPS  # the host copy is read back after replays

    logits.append(step(model, cache, toks[:, STEPS:], p0 + STEPS))  # eager again after the replays
    out = torch.stack(logits, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for name in ("state", "win_k", "win_pos", "sink_k", "seen", "length"):
        a, b = getattr(layer, name), getattr(ref_cache.layers[0], name)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_decode_step_compiled_with_reduce_overhead():
    """One compiled decode graph (no recompiles, no graph breaks), run as CUDA graph trees (no cudagraph skips)."""
    from torch._dynamo.utils import counters

    model, ids, mask, pos, toks, p0 = setup(ligerfx.LigerConfig(window=W, sinks=1))
    ref, _ = eager_reference(model, ids, mask, pos, toks, p0)

    cache = prefilled(model, ids, mask, pos)
    addresses = buffers(cache)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda tok, p: step(model, cache, tok, p), mode="reduce-overhead", fullgraph=True)
    logits = []
    for i in range(STEPS + 1):
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            logits.append(compiled(toks[:, i:i + 1].clone(), p0 + i).clone())
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert buffers(cache) == addresses
    assert cache.layers[0].cumulative_length == ids.shape[1] + STEPS + 1
    torch.testing.assert_close(torch.stack(logits, 1), ref, atol=1e-4, rtol=1e-4)
