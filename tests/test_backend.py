"""torch.compile(backend="ligerfx"): the linearize pass on Dynamo graphs, lowered by AOT/Inductor."""
import copy

import pytest
import torch
from transformers import DynamicCache

import ligerfx
from ligerfx.backend import make_backend
from models import left_padded, tiny


def _valid_close(a, b, mask, tol):
    v = mask.bool()[..., None].expand_as(a)
    return (a - b)[v].abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_backend_linearizes_untransformed_model(arch):
    model = tiny(arch)
    eager = ligerfx.transform(copy.deepcopy(model))
    ids, mask, pos = left_padded(T=40, pad=(0, 5))
    torch._dynamo.reset()
    before = ligerfx.counters["backend.linearize"]
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        b = eager(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert ligerfx.counters["backend.linearize"] - before == model.config.num_hidden_layers
    assert _valid_close(a, b, mask, 1e-5)


def test_backend_training_step_matches_eager():
    model = tiny("qwen3")
    eager = ligerfx.transform(copy.deepcopy(model))
    ids, mask, pos = left_padded(T=32, pad=(0, 4))
    labels = ids.masked_fill(mask == 0, -100)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    la = compiled(ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False).loss
    lb = eager(ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    ga = model.model.layers[1].self_attn.k_proj.weight.grad
    gb = eager.model.layers[1].self_attn.k_proj.weight.grad
    assert (ga - gb).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_teacher_mode_under_the_backend_gives_the_teacher(arch):
    """A transformed model compiled with the ligerfx backend, called inside ``teacher_mode`` (as ``ligerfx train
    --distill --compile`` does), returns the original softmax model's logits, and outside it the linearized
    model's: the backend must not linearize the teacher's graph, and Dynamo must not reuse one graph for the other.
    (The backend once linearized the teacher graph too: the KL of a compiled distillation run was 0.)"""
    model = tiny(arch)
    teacher_ref = copy.deepcopy(model)
    ligerfx.transform(model)
    ids, mask, pos = left_padded(T=40, pad=(0, 5))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    kw = dict(attention_mask=mask, position_ids=pos, use_cache=False)
    with torch.no_grad():
        want_teacher = teacher_ref(ids, **kw).logits
        want_student = model(ids, **kw).logits
        student_first = compiled(ids, **kw).logits
        with ligerfx.teacher_mode(model):
            teacher = compiled(ids, **kw).logits
        student_again = compiled(ids, **kw).logits
    assert not _valid_close(want_teacher, want_student, mask, 1e-3)  # the two differ: the test can tell them apart
    assert _valid_close(teacher, want_teacher, mask, 1e-5)
    assert _valid_close(student_first, want_student, mask, 1e-5)
    assert _valid_close(student_again, want_student, mask, 1e-5)
    assert not any(m.teacher for m in ligerfx.api._modules(model))  # teacher_mode restored the sites


def test_hybrid_model_graph_piece_without_ligerfx_ops_stays_softmax():
    """A hybrid transformed model (layers=[1]) whose Dynamo capture breaks after layer 0: the first graph piece holds
    only layer 0's softmax attention and no ligerfx op. The backend must recognise the transformed model (by its
    parameters) and leave that layer softmax: compiled == eager transformed model."""
    model = tiny("llama", num_hidden_layers=3)
    ligerfx.transform(model, config=ligerfx.LigerConfig(layers=[1]))
    ids, mask, pos = left_padded(T=40, pad=(0, 5))
    kw = dict(attention_mask=mask, position_ids=pos, use_cache=False)
    with torch.no_grad():
        want = model(ids, **kw).logits
    layer0 = model.model.layers[0]
    inner = layer0.forward

    def forward_then_break(*args, **kwargs):
        out = inner(*args, **kwargs)
        torch._dynamo.graph_break()
        return out

    layer0.forward = forward_then_break
    torch._dynamo.reset()
    before = ligerfx.counters["backend.linearize"]
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    with torch.no_grad():
        got = compiled(ids, **kw).logits
    assert ligerfx.counters["backend.linearize"] == before  # nothing linearized by the backend
    assert _valid_close(got, want, mask, 1e-5)


def test_backend_inductor_registered_by_name():
    model = tiny("llama")
    eager = ligerfx.transform(copy.deepcopy(model))
    ids, mask, pos = left_padded(T=24, pad=(0, 3))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ligerfx")
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        b = eager(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert _valid_close(a, b, mask, 1e-5)


def test_backend_refuses_decode_of_untransformed_model():
    model = tiny("llama")
    ids, mask, pos = left_padded(T=12)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        with pytest.raises(Exception, match=r"ligerfx\.transform"):
            compiled(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), position_ids=pos[:, -1:] + 1,
                     cache=cache, use_cache=True)


def test_compiling_a_transformed_model_has_no_graph_breaks():
    model = ligerfx.transform(tiny("llama"))
    ids, mask, pos = left_padded(T=40, pad=(0, 5))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(ids, attention_mask=mask, position_ids=pos, use_cache=False)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    before = ligerfx.counters["backend.linearize"]
    compiled = torch.compile(model, backend=make_backend("aot_eager"))
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        b = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert ligerfx.counters["backend.linearize"] == before  # nothing to rewrite: the ligerfx ops are there
    assert _valid_close(a, b, mask, 1e-5)


def test_compiled_generation_matches_eager_without_recompiling_per_token():
    model = ligerfx.transform(tiny("llama"))
    ids, mask, _ = left_padded(T=12, pad=(0, 4))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    torch._dynamo.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return make_backend("eager")(gm, example_inputs)

    model.forward = torch.compile(model.forward, backend=count)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(out, ref)  # the in-place state/window updates survived compilation
    assert len(graphs) <= 3  # prefill, first decode, then one dynamic decode graph for all later tokens
