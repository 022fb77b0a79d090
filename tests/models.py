"""Tiny random-weight causal LMs built from configs (no downloads)."""
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # q/k norms before the transpose
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,  # q/k norms, sliding layers, query_pre_attn_scalar
               {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
                "query_pre_attn_scalar": 16}),
}


def tiny(arch: str, attn: str = "sdpa", seed: int = 0, dtype=torch.float32, **overrides):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = attn
    model = model_cls(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    with torch.no_grad():  # random weights large enough that attention is not uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(2.0)
    return model


def left_padded(B=2, T=30, pad=(0, 7), vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def assert_generate_is_greedy_full_forward(model, ids, mask, steps: int, valid_positions: bool = False):
    """Cached greedy ``generate()`` == greedy decoding by uncached full forwards: the same tokens, and each step's
    logits within 1e-4 (relative). ``valid_positions``: the full forwards get position ids counting valid tokens, as
    ``generate()`` builds them (needed where absolute positions matter, e.g. ``LigerConfig.sink_position``)."""
    from reference import rel

    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        seq, m = ids, mask
        for step in range(steps):
            kw = {"position_ids": (m.cumsum(1) - 1).clamp_min(0)} if valid_positions else {}
            logits = model(seq, attention_mask=m, **kw).logits[:, -1]
            assert rel(out.logits[step], logits) < 1e-4, step
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)
