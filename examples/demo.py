"""make demo: linearize a tiny random Llama with ligerfx and generate at constant memory (CPU, seconds).

Prints the rewrite counter, a greedy continuation of the transformed model, and the cache bytes of the teacher and
the linearized model as the context grows (the teacher's KV cache grows, ligerfx's does not).
"""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ligerfx


def main():
    print("# python examples/demo.py")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    teacher = LlamaForCausalLM(cfg).eval()
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(teacher.state_dict())
    model.generation_config.eos_token_id = teacher.generation_config.eos_token_id = None

    t0 = time.time()
    ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(window=64))
    print(f"linearized {ligerfx.counters['linearize']} attention layers in {time.time() - t0:.1f}s: "
          f"{[s.path for s in ligerfx.sites(model)]}")

    prompt = torch.randint(0, 256, (2, 16))
    print(f"{'context':>8} {'teacher KV bytes':>18} {'ligerfx bytes':>14} {'ligerfx tok/s':>14}")
    for n in (64, 256, 1024):
        with torch.no_grad():
            t = teacher.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            t0 = time.time()
            o = model.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            dt = time.time() - t0
        print(f"{16 + n:>8} {ligerfx.cache_nbytes(t.cache):>18,} "
              f"{ligerfx.cache_nbytes(o.cache):>14,} {2 * n / dt:>14.0f}")
    print("first generated tokens:", o.sequences[0, 16:32].tolist())


if __name__ == "__main__":
    main()
