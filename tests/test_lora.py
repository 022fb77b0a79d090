"""The ``lora`` pass and peft-format adapters on linearized tiny models (Llama, and Phi-3 for a fused qkv)."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import ligerfx
from ligerfx.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, has_lora, load_adapter,
                              lora_disabled, lora_layers, merge_lora, save_adapter)
from ligerfx.passes.lora import lora_options, lora_pass

DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**DIMS)).eval()


def phi3(seed=0):
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**DIMS, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def liger(make=llama, lora=None, seed=0, passes=("linearize", "lora")):
    model = make(seed)
    return ligerfx.transform(model, passes=list(passes), config=ligerfx.LigerConfig(lora=lora))


def randomize_lora(model, seed=1):
    """LoRA B starts at zero (a no-op adapter); give it values so the tests can see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def ids():
    return torch.randint(3, DIMS["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(5))


def test_only_lora_trainable_default_qkv():
    model = liger()
    layers = lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{r}_proj" for i in range(2) for r in "qkv")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 6
    assert model._ligerfx_report["lora"] == 6
    lora = next(iter(layers.values()))
    assert lora.r["default"] == 8 and lora.scaling["default"] == 1.0  # r=8, alpha=8


def test_targets_o_and_rank_from_config():
    model = liger(lora={"targets": ["q", "k", "v", "o"], "r": 4, "alpha": 16, "dropout": 0.0})
    layers = lora_layers(model)
    assert len(layers) == 8 and "model.layers.1.self_attn.o_proj" in layers
    assert layers["model.layers.0.self_attn.o_proj"].scaling["default"] == 4.0


def test_lora_options_validation():
    assert lora_options(None)["targets"] == ("q", "k", "v")
    assert lora_options({"targets": "q,o"})["targets"] == ("q", "o")
    with pytest.raises(ValueError, match="unknown keys"):
        lora_options({"rank": 8})
    with pytest.raises(ValueError, match="targets"):
        lora_options({"targets": ["q", "gate"]})


def test_lora_pass_twice_refused():
    model = liger()
    with pytest.raises(ValueError, match="already has LoRA"):
        lora_pass(model, ligerfx.LigerConfig())


def test_adapter_round_trip_exact(tmp_path, ids):
    model = randomize_lora(liger(lora={"targets": ["q", "k", "v", "o"]}))
    with torch.no_grad():
        ref = model(ids).logits
    save_adapter(model, tmp_path)

    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert len(cfg["target_modules"]) == 8
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == {"base_model.model." + k for k in adapter_state_dict(model)}

    fresh = liger(passes=["linearize"])  # same base weights, no LoRA yet: load_adapter injects it
    assert not has_lora(fresh)
    load_adapter(fresh, tmp_path)
    a, b = adapter_state_dict(model), adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    assert not any(p.requires_grad for p in fresh.parameters())

    again = liger(lora={"targets": ["q", "k", "v", "o"]}, seed=0)  # LoRA already injected (resume path)
    load_adapter(again, tmp_path, trainable=True)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    assert all(("lora_" in n) == p.requires_grad for n, p in again.named_parameters())


def test_load_adapter_mismatch_is_an_error(tmp_path):
    save_adapter(randomize_lora(liger(lora={"targets": ["q", "k", "v", "o"]})), tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(liger(), tmp_path)  # model has q,k,v LoRA only


def test_peft_from_pretrained_loads_our_adapter(tmp_path, ids):
    from peft import PeftModel

    model = randomize_lora(liger())
    with torch.no_grad():
        ref = model(ids).logits
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(liger(passes=["linearize"]), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, ref)


def test_merge_equals_unmerged(ids):
    model = randomize_lora(liger(lora={"targets": ["q", "k", "v", "o"]}))
    with torch.no_grad():
        ref = model(ids).logits
    assert merge_lora(model) == 8
    assert not has_lora(model) and not hasattr(model, "peft_config")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_teacher_without_lora_is_the_original_model(ids):
    with torch.no_grad():
        original = llama(0)(ids).logits
    model = randomize_lora(liger())
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad(), ligerfx.teacher_mode(model), lora_disabled(model):
        teacher = model(ids).logits
    torch.testing.assert_close(teacher, original, atol=1e-5, rtol=1e-5)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, original, atol=1e-3)  # adapters back on, Liger attention


def test_fused_qkv_wrapped_once(tmp_path, ids):
    model = liger(phi3)
    site = ligerfx.sites(model)[0]
    assert site.projections["q"] == site.projections["k"] == site.projections["v"]
    assert sorted(lora_layers(model)) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    assert model._ligerfx_report["lora"] == 2

    full = randomize_lora(liger(phi3, lora={"targets": ["q", "k", "v", "o"]}))
    assert len(lora_layers(full)) == 4
    with torch.no_grad():
        ref = full(ids).logits
    save_adapter(full, tmp_path)
    fresh = load_adapter(liger(phi3, passes=["linearize"]), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    merge_lora(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, atol=1e-5, rtol=1e-5)
