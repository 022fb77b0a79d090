"""Gemma-3-270M on a GPU: transform, bf16 decode-vs-full-forward agreement, perplexity, cache and latency.

    python benchmarks/gemma_check.py --out benchmarks/results/gemma-check-<card>.json

Checks the decode path (which log-likelihood benchmarks never exercise): prefill + token-by-token decode logits vs
the full-sequence forward on real text, teacher and untrained ligerfx perplexity on WikiText-2, and per-token decode
latency and cache bytes at several context lengths (teacher vs ligerfx, same weights).
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import ligerfx
from ligerfx.models import load_model


def ppl(model, ids, chunk=1024):
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[1] - 1, chunk):
            x = ids[:, s:s + chunk + 1]
            if x.shape[1] < 2:
                break
            out = model(x[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(out[0], x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
    return math.exp(nll / n)


def decode_agreement(model, ids, prefill=32):
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = DynamicCache(config=model.config)
        outs = [model(ids[:, :prefill], cache=cache, use_cache=True).logits.float()]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits.float())
    d = (torch.cat(outs, 1) - full).abs()
    agree = (torch.cat(outs, 1).argmax(-1) == full.argmax(-1)).float().mean().item()
    return d.max().item(), d.mean().item(), agree


def decode_latency(model, ctx, steps=32):
    dev = next(model.parameters()).device
    ids = torch.randint(10, 1000, (1, ctx), device=dev)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3, ligerfx.cache_nbytes(cache), torch.cuda.max_memory_allocated()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--wikitext", default="../shared/data/wikitext2/wiki.test.raw")
    p.add_argument("--tokens", type=int, default=16384, help="WikiText tokens for perplexity")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    print(f"# python benchmarks/gemma_check.py  ({card}, torch {torch.__version__})")
    model, tok = load_model(args.model, dtype="bfloat16", device="cuda")
    text = Path(args.wikitext).read_text(encoding="utf-8")[: args.tokens * 8]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens].cuda()
    res = {"card": card, "model": args.model, "dtype": "bfloat16"}
    res["teacher_ppl"] = ppl(model, ids)
    mx, mean, agree = decode_agreement(model, ids[:, :512])  # bf16 baseline: the softmax model's own gap
    res["teacher_decode_vs_full"] = {"max_abs_logit_diff": mx, "mean_abs_logit_diff": mean,
                                     "argmax_agreement": agree, "tokens": 512, "prefill": 32}
    lat = {}
    for c in map(int, args.contexts.split(",")):
        torch.cuda.reset_peak_memory_stats()
        lat[c] = {"teacher": decode_latency(model, c)}
    t0 = time.time()
    ligerfx.transform(model)
    res["transform_s"] = time.time() - t0
    res["ligerfx_untrained_ppl"] = ppl(model, ids)
    mx, mean, agree = decode_agreement(model, ids[:, :512])
    res["decode_vs_full"] = {"max_abs_logit_diff": mx, "mean_abs_logit_diff": mean, "argmax_agreement": agree,
                             "tokens": 512, "prefill": 32}
    for c in lat:
        torch.cuda.reset_peak_memory_stats()
        lat[c]["ligerfx"] = decode_latency(model, c)
    res["decode"] = [{"context": c, "teacher_ms": v["teacher"][0], "teacher_cache_bytes": v["teacher"][1],
                      "ligerfx_ms": v["ligerfx"][0], "ligerfx_cache_bytes": v["ligerfx"][1],
                      "ligerfx_peak_bytes": v["ligerfx"][2], "teacher_peak_bytes": v["teacher"][2]}
                     for c, v in lat.items()]
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
