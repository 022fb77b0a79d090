"""Batched scoring forwards, as lm-eval issues them: teacher against each ligerfx variant, same weights.

    TRITON_INTERPRET=0 python benchmarks/eval_forward.py [--model gemma-shape] [--batches 40] [--batch 64]
        [--min-len 24] [--max-len 200] [--variants gla,swa_sinks,complementary] [--dtype bf16] [--out-dir DIR]

lm-eval's log-likelihood requests reach the model as ``model(input_ids)`` on right-padded batches whose length
changes from batch to batch (no attention mask: causal attention keeps the padding out of the scored tokens). This
script replays that: ``--batches`` batches of ``--batch`` rows, each batch padded to a random length in
[min-len, max-len] (seeded, the same lengths for every model), one forward each under ``torch.no_grad()``.

Each model runs the batch list twice: the **cold** pass includes whatever the first sight of a shape costs (Triton
compiling a kernel for a new specialization, the caching allocator growing), the **warm** pass replays the same
shapes (and once more with ``use_cache=True``, the cache lm-eval's plain ``model(input_ids)`` call makes HF build).
Printed: a table (seconds per pass, ms per batch, tokens per second, warm ratio to the teacher) with the card
name; written: ``eval-forward-<card>.json`` under ``--out-dir``.

Models: ``gemma-shape`` is a random-init Llama with Gemma-3-270M's attention shapes (hidden 640, 18 layers, 4 query /
1 KV heads, head dim 256, vocabulary 262,144), ``llama-1b`` / ``llama-tiny`` as in ``benchmarks/decode.py``; any
other name goes to ``ligerfx.models.load_model``.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decode as dec  # noqa: E402  (model shapes and loading, shared with the decode benchmark)
import ligerfx  # noqa: E402

dec.LLAMA["gemma-shape"] = {**dec.LLAMA["llama-1b"], "hidden_size": 640, "num_hidden_layers": 18,
                            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                            "intermediate_size": 2048, "vocab_size": 262144}


def lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    if not 1 <= lo <= hi:
        raise SystemExit(f"--min-len {lo} / --max-len {hi}: need 1 <= min-len <= max-len")
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def run_pass(model, batches, device, use_cache: bool = False) -> tuple[float, list[float]]:
    """One forward per batch; ``use_cache=True`` is what lm-eval's ``model(input_ids)`` gets from the config by default
    (a cache built and never read), False what ``ligerfx eval`` runs since session 17."""
    per = []
    dec.sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=use_cache)
            logits = out.logits
            if not torch.isfinite(logits[:, -1]).all():
                raise RuntimeError(f"non-finite logits for a batch of shape {tuple(ids.shape)}")
            dec.sync(device)
            per.append(time.perf_counter() - t)
            del out, logits
    return time.perf_counter() - t0, per


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-shape")
    ap.add_argument("--variants", default="gla,swa_sinks,complementary")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(dec.DTYPES), default=None,
                    help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = dec.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lens = lengths(args.batches, args.min_len, args.max_len, args.seed)

    base = dec.load(args.model, dtype, device)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, n), generator=g).to(device) for n in lens]
    tokens = args.batch * sum(lens)
    print(f"card: {card}; torch {torch.__version__}; {args.model}; {dtype}; {args.batches} batches of {args.batch} "
          f"rows, lengths {min(lens)}-{max(lens)} ({len(set(lens))} distinct), {tokens:,} tokens per pass", flush=True)

    rows = []
    for impl in ["teacher"] + [v for v in args.variants.split(",") if v]:
        model = base if impl == "teacher" else ligerfx.transform(
            copy.deepcopy(base), passes=["linearize"], config=ligerfx.LigerConfig(variant=impl))
        cold, _ = run_pass(model, batches, device)
        warm, per = run_pass(model, batches, device)
        warm_cache, _ = run_pass(model, batches, device, use_cache=True)
        per.sort()
        rows.append({"impl": impl, "cold_s": cold, "warm_s": warm, "ms_per_batch_median": 1e3 * per[len(per) // 2],
                     "tokens_per_s_warm": tokens / warm, "warm_with_cache_s": warm_cache})
        print(f"[eval_forward] {impl}: cold {cold:.2f}s, warm {warm:.2f}s, warm with a cache {warm_cache:.2f}s",
              flush=True)
        if model is not base:
            del model
            dec.free(device)

    teacher = rows[0]["warm_s"]
    print(f"\n## {args.model} | {card} | {dtype} | batch {args.batch} | lengths {args.min_len}-{args.max_len}")
    print("| model | cold pass s | warm pass s | ms / batch (warm median) | tokens/s (warm) | warm time / teacher | "
          "warm pass with a cache s (lm-eval's default call) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["warm_over_teacher"] = r["warm_s"] / teacher
        print(f"| {r['impl']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['ms_per_batch_median']:.2f} | "
              f"{r['tokens_per_s_warm']:,.0f} | {r['warm_over_teacher']:.2f}x | {r['warm_with_cache_s']:.2f} |")
    out = Path(args.out_dir) / f"eval-forward-{dec.card_slug(card)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "card": card, "torch": torch.__version__,
                               "model": args.model, "dtype": str(dtype), "batch": args.batch, "lengths": lens,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
