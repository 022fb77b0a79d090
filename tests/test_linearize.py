"""The linearize pass end to end on tiny Llama / Mistral / Qwen2 / Qwen3 / Gemma3 models."""
import copy
import types

import pytest
import torch
from transformers import DynamicCache

import ligerfx
from ligerfx.cache import LigerLayer, cache_nbytes
from models import ARCHS, left_padded, tiny
from reference import gla_recurrence64, window_attention64

ALL = list(ARCHS)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def reference_liger_forward(valid, window=64, mix=0.5, normalizer=16.0):
    """A Liger attention forward written independently of ligerfx (float64, token-by-token), for HF attention
    modules of the Llama family (q/k norms optional). ``valid`` [B, T] marks non-padding tokens."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        hd = self.head_dim
        q = self.q_proj(hidden_states).view(B, T, -1, hd)
        k = self.k_proj(hidden_states).view(B, T, -1, hd)
        v = self.v_proj(hidden_states).view(B, T, -1, hd).transpose(1, 2)
        gate = k.transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = (x.unsqueeze(1) for x in position_embeddings)
        qr, kr = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        m = valid[:, None, :, None].double()
        o_gla, _ = gla_recurrence64(q.softmax(-1), k.softmax(-1) * m, v * m,
                                    torch.nn.functional.logsigmoid(gate) / normalizer * m)
        pos = (valid.long().cumsum(1) - 1).masked_fill(~valid, -1)
        o_swa = window_attention64(qr, kr, v, pos, pos, self.scaling, window)
        o = (mix * o_gla + (1 - mix) * o_swa).to(hidden_states.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), None

    return forward


def incremental_logits(model, ids, mask, pos, prefill: int):
    """Prefill ``prefill`` tokens, then decode one token at a time through the HF cache; returns (logits, cache)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                      cache=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("arch", ALL)
def test_pass_fires_on_every_layer_and_adds_no_parameters(arch):
    model = tiny(arch)
    n_params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    before = ligerfx.counters["linearize"]
    ligerfx.transform(model)
    assert ligerfx.counters["linearize"] - before == model.config.num_hidden_layers
    assert len(ligerfx.sites(model)) == model.config.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert set(model.state_dict()) == keys
    site = ligerfx.sites(model)[0]
    assert site.projections["k"].endswith("k_proj") and site.projections["o"].endswith("o_proj")
    assert model.config.ligerfx["window"] == 64 and model.config.ligerfx["passes"] == ["linearize"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train", [False, True])
def test_no_softmax_attention_left_running(attn, train):
    """The replaced softmax attention must be gone from the generated code, not computed and thrown away (SDPA and
    dropout look impure to FX's dead-code elimination because of their dropout_p)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    T = 40
    model = tiny("llama", attn=attn)
    ligerfx.transform(model)
    model.train(train)
    with Record() as rec:
        model(input_ids=torch.randint(0, 100, (2, T)), use_cache=False)
    names = [c[0] for c in rec.calls]
    assert not [n for n in names if "scaled_dot_product" in n or "dropout" in n], names
    # the only softmaxes left are the feature maps over the head dimension, never over T keys
    assert all(shapes[0][-1] != T for name, shapes in rec.calls if "softmax" in name and shapes)


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("attn,dtype", [("sdpa", torch.float64), ("eager", torch.float64), ("sdpa", torch.float32)])
def test_forward_equals_float64_reference(arch, attn, dtype):
    """The capture differs per dtype (fp32 drops no-op casts, bf16/fp64 keep them): check both."""
    model = tiny(arch, attn=attn, dtype=dtype)
    ids, mask, pos = left_padded(T=80, pad=(0, 9))
    ref_model = copy.deepcopy(model).double()
    valid = mask.bool()
    for layer in ref_model.model.layers:
        layer.self_attn.forward = types.MethodType(reference_liger_forward(valid), layer.self_attn)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, position_ids=pos).logits
        teacher = model(ids, attention_mask=mask, position_ids=pos).logits
        ligerfx.transform(model)
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    v = valid[..., None].expand_as(out)
    err = ((out.double() - ref)[v].norm() / ref[v].norm()).item()
    assert err <= (1e-6 if dtype == torch.float64 else 1e-5), err
    if attn == "sdpa":  # (HF's eager float64 teacher turns padded rows into NaN)
        assert ((teacher.double() - ref)[v].norm() / ref[v].norm()).item() > 1e-2  # the reference is not the teacher


@pytest.mark.parametrize("arch", ALL)
def test_prefill_then_decode_equals_full_forward(arch):
    model = ligerfx.transform(tiny(arch))
    ids, mask, pos = left_padded(T=100, pad=(0, 11))
    P = 30
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    inc, cache = incremental_logits(model, ids, mask, pos, P)
    v = mask.bool()[..., None].expand_as(full)
    assert all(isinstance(layer, LigerLayer) for layer in cache.layers)
    assert (inc - full)[v].abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ALL)
def test_cache_bytes_do_not_grow(arch):
    W = 16
    model = ligerfx.transform(tiny(arch), config=ligerfx.LigerConfig(window=W))
    ids, mask, _ = left_padded(T=8, pad=(0, 3))
    sizes = {}
    with torch.no_grad():
        for n in (2 * W, 8 * W):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 return_dict_in_generate=True)
            assert out.sequences.shape[1] == ids.shape[1] + n
            sizes[n] = cache_nbytes(out.past_key_values)
    assert sizes[2 * W] == sizes[8 * W] > 0
    teacher = tiny(arch)
    with torch.no_grad():
        t = [cache_nbytes(teacher.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False, return_dict_in_generate=True).past_key_values)
             for n in (2 * W, 8 * W)]
    assert t[1] > t[0]  # the softmax KV cache does grow


@pytest.mark.parametrize("arch", ALL)
def test_generate_equals_teacher_forced_argmax(arch):
    model = ligerfx.transform(tiny(arch))
    ids, mask, _ = left_padded(T=12, pad=(0, 4))
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        pos = (full_mask.cumsum(1) - 1).masked_fill(full_mask == 0, 1)
        logits = model(seq, attention_mask=full_mask, position_ids=pos).logits
    pred = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(pred, seq[:, ids.shape[1]:])


def test_sampling_and_beam_search_run():
    model = ligerfx.transform(tiny("llama"))
    ids, mask, _ = left_padded(T=10, pad=(0, 3))
    with torch.no_grad():
        s = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5)
        b = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert s.shape == b.shape == (2, 18)


def test_assisted_decoding_is_refused():
    model = ligerfx.transform(tiny("llama"))
    ids, mask, _ = left_padded(T=10)
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, assistant_model=tiny("llama"))


@pytest.mark.parametrize("arch", ALL)
def test_save_and_reload(tmp_path, arch):
    cfg = ligerfx.LigerConfig(window=8, mix=0.25)
    model = ligerfx.transform(tiny(arch), config=cfg)
    ids, mask, pos = left_padded(T=40)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, position_ids=pos).logits
    model.save_pretrained(tmp_path)
    import json
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__] and saved["ligerfx"]["mix"] == 0.25
    again = ligerfx.from_pretrained(tmp_path)
    assert again.config.ligerfx["window"] == 8 and len(ligerfx.sites(again)) == 2
    with torch.no_grad():
        after = again(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(before, after)


def test_layers_hybrid_keeps_other_layers_softmax():
    model = tiny("llama", num_hidden_layers=3)
    teacher = copy.deepcopy(model)
    ligerfx.transform(model, config=ligerfx.LigerConfig(layers=[1]))
    assert [s.layer_idx for s in ligerfx.sites(model)] == [1]
    ids, mask, pos = left_padded(T=40, pad=(0, 5))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             return_dict_in_generate=True)
        # layer 0 is untouched: its output equals the teacher's
        h_t = teacher.model.layers[0](teacher.model.embed_tokens(ids), position_embeddings=teacher.model.rotary_emb(
            teacher.model.embed_tokens(ids), pos), attention_mask=None)
        h_m = model.model.layers[0](model.model.embed_tokens(ids), position_embeddings=model.model.rotary_emb(
            model.model.embed_tokens(ids), pos), attention_mask=None)
    assert torch.equal(h_t, h_m)
    layers = seq.past_key_values.layers
    assert isinstance(layers[1], LigerLayer) and not isinstance(layers[0], LigerLayer)
    assert layers[0].get_seq_length() == ids.shape[1] + 9
    assert not torch.equal(full, teacher(ids, attention_mask=mask, position_ids=pos).logits)


def test_gemma3_only_full_attention():
    model = ligerfx.transform(tiny("gemma3"), config=ligerfx.LigerConfig(only_full_attention=True))
    assert [s.layer_idx for s in ligerfx.sites(model)] == [1]
    ids, mask, _ = left_padded(T=12, pad=(0, 4))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(out.past_key_values.layers[1], LigerLayer)


def test_teacher_mode_restores_softmax():
    model = tiny("qwen3")
    ids, mask, pos = left_padded(T=20)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        ligerfx.transform(model)
        with ligerfx.teacher_mode(model):
            t = model(ids, attention_mask=mask, position_ids=pos).logits
        lin = model(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(t, ref) and not torch.allclose(lin, ref)


def test_training_gradients_flow():
    model = ligerfx.transform(tiny("llama"))
    ids, mask, pos = left_padded(T=40, pad=(0, 6))
    out = model(ids, attention_mask=mask, position_ids=pos, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    g = model.model.layers[0].self_attn.k_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="known passes"):
        ligerfx.transform(model, passes=["linearize", "quantize"])
    with pytest.raises(ValueError, match="variant"):
        ligerfx.LigerConfig(variant="mamba")
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\]"):
        ligerfx.transform(tiny("llama"), config=ligerfx.LigerConfig(layers=[7]))


def test_unmatched_attention_raises():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(ligerfx.UnsupportedAttentionError, match=r"model\.layers\.0\.self_attn.*soft-capping"):
        ligerfx.transform(model)


def test_recapture_for_new_dtype_keeps_lora_in_the_gate():
    """After LoRA injection and a dtype change the forward is re-derived from the graph; the LoRA on k_proj
    still feeds the gate (pure GLA, so only the recurrent branch sees k)."""
    model = ligerfx.transform(tiny("llama"), passes=["linearize", "lora"],
                              config=ligerfx.LigerConfig(mix=1.0, lora={"targets": ["k"], "r": 4, "alpha": 4}))
    ids, mask, pos = left_padded(T=24)
    with torch.no_grad():
        base = model(ids, attention_mask=mask, position_ids=pos).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        with_lora = model(ids, attention_mask=mask, position_ids=pos).logits
        model.double()
        again = model(ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.allclose(base, with_lora)
    assert (again - with_lora.double()).abs().max().item() < 1e-4
    assert len(model.model.layers[0].self_attn._ligerfx.fns) == 2  # one derived forward per dtype


def test_fused_qkv_and_partial_rotary():
    """Phi-3: one fused qkv projection sliced into q/k/v, RoPE on half of each head."""
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = Phi3ForCausalLM(cfg).eval()
    ligerfx.transform(model)
    site = ligerfx.sites(model)[0]
    assert site.projections["q"] == site.projections["k"] == site.projections["v"] == \
        "model.layers.0.self_attn.qkv_proj"
    ids, mask, pos = left_padded(T=90, pad=(0, 5))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    inc, _ = incremental_logits(model, ids, mask, pos, 20)
    v = mask.bool()[..., None].expand_as(full)
    assert (inc - full)[v].abs().max().item() <= 1e-5
    # the gate is the full key head (both the rotated and the pass-through half), pre-RoPE
    info = model.model.layers[0].self_attn._ligerfx.info
    assert info.head_dim == 16 and info.n_heads == 4 and info.n_kv_heads == 2


@pytest.mark.parametrize("cfg", [ligerfx.LigerConfig(variant="swa_sinks", window=8),
                                 ligerfx.LigerConfig(mix=1.0), ligerfx.LigerConfig(window=8, sinks=2)],
                         ids=["swa_sinks", "pure_gla", "gla_sinks"])
def test_variants_decode_equals_full_forward(cfg):
    """Window + sinks baseline, pure GLA and GLA with sinks keep prefill + decode == full forward."""
    model = ligerfx.transform(tiny("llama"), config=cfg)
    ids, mask, pos = left_padded(T=50, pad=(0, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    inc, cache = incremental_logits(model, ids, mask, pos, 10)
    v = mask.bool()[..., None].expand_as(full)
    assert (inc - full)[v].abs().max().item() <= 1e-5
    layer = cache.layers[0]
    if cfg.recurrent_weight == 0:
        assert layer.state is None and layer.sink_k is not None
    if cfg.mix == 1.0:
        assert layer.win_k is None  # pure GLA keeps no window
