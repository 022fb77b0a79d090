"""Next-token loss by position on long WikiText-2 articles: where a linearized model loses to the teacher.

For the teacher and each variant (``ligerfx eval`` flags, as in ``benchmarks/layer_drift.py``), the first
``--docs`` WikiText-2 test articles (detokenized like lm-eval's task, BOS first) are cut to ``--tokens`` tokens and
run in one uncached forward; the loss of predicting token ``t`` from tokens ``< t`` is averaged per position bucket.
With a window of 64 and 4 sinks, every prefix of a target at position ``t <= 68`` is seen whole by the window
(there ``swa_sinks`` is the teacher); beyond, only a recurrent state (or full attention) sees the rest. Prints a
table of token perplexity ``exp(mean loss)`` per bucket and writes a JSON and a PNG.

    python benchmarks/nll_by_position.py --docs 8 --tokens 2048 --device cpu --dtype float32 \\
        --variant "swa_sinks=--variant swa_sinks" \\
        --variant "complementary+adapter=--adapter examples/adapters/gemma-3-270m-liger-complementary" \\
        --out docs/results/quality/checks/nll_by_position_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layer_drift import parse_variant  # noqa: E402  (the same NAME=FLAGS parsing of ligerfx eval flags)

from ligerfx.evaluation import cli as eval_cli  # noqa: E402
from ligerfx.evaluation.harness import _default_texts, default_data_dir  # noqa: E402

EDGES = (1, 69, 256, 512, 1024, 2048, 1 << 30)  # 512: Gemma 3 local layers see 512 tokens


def buckets_for(tokens: int) -> list[tuple[int, int]]:
    """Target-position buckets [lo, hi) up to ``tokens``: 1-68 (all in the window + sinks), 69-255, 256-511,
    512-1023, ..."""
    out = []
    for lo, hi in zip(EDGES, EDGES[1:]):
        if lo >= tokens:
            break
        out.append((lo, min(hi, tokens)))
    return out


@torch.no_grad()
def nll_by_position(model, tok, texts: list[str], tokens: int) -> dict:
    """Sum and count of the next-token loss per position bucket over ``texts`` (each cut to ``tokens`` tokens)."""
    dev = next(model.parameters()).device
    edges = buckets_for(tokens)
    acc = {f"{lo}-{hi - 1}": [0.0, 0] for lo, hi in edges}
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[:, :tokens].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double()  # target t = 1..T-1
        if not torch.isfinite(loss).all():
            raise RuntimeError("non-finite loss")
        for lo, hi in edges:
            part = loss[lo - 1: hi - 1]
            acc[f"{lo}-{hi - 1}"][0] += part.sum().item()
            acc[f"{lo}-{hi - 1}"][1] += part.numel()
    return {k: {"tokens": n, "mean_nll": s / n if n else None, "ppl": math.exp(s / n) if n else None}
            for k, (s, n) in acc.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a model to compare with the teacher, as ligerfx eval flags (repeatable)")
    ap.add_argument("--out", default=None, help="JSON path (a PNG beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    texts = _default_texts(data_dir, args.docs)
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    runs = [parse_variant("teacher=", common, allow_teacher=True)] + [parse_variant(v, common) for v in args.variant]
    result = {"what": "next-token loss by target position on WikiText-2 test articles", "docs": len(texts),
              "tokens": args.tokens, "device": args.device, "dtype": args.dtype, "model": args.model,
              "variants": {}}
    for name, ns in runs:
        t0 = time.time()
        model, tok, meta = eval_cli.build_model(ns)
        model.eval()
        r = nll_by_position(model, tok, texts, args.tokens)
        result["variants"][name] = {"buckets": r, "transform": meta.get("transform"), "adapter": meta.get("adapter"),
                                    "seconds": round(time.time() - t0, 1)}
        print(f"[nll_by_position] {name}: " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in r.items()),
              file=sys.stderr, flush=True)
        del model
        if args.out:  # after every model: a run stopped by a time limit keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1))
    keys = list(next(iter(result["variants"].values()))["buckets"])
    print(f"\ntoken perplexity by target position ({len(texts)} WikiText-2 articles, first {args.tokens} tokens)\n")
    print("| model | " + " | ".join(f"{k} ({result['variants']['teacher']['buckets'][k]['tokens']})" for k in keys)
          + " |")
    print("|---|" + "---:|" * len(keys))
    for name, v in result["variants"].items():
        print(f"| {name} | " + " | ".join(f"{v['buckets'][k]['ppl']:.2f}" for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        plot(result, str(Path(args.out).with_suffix(".png")))
        print(f"\nwrote {args.out}")
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, v in result["variants"].items():
        keys = list(v["buckets"])
        ax.plot(range(len(keys)), [v["buckets"][k]["ppl"] for k in keys], "o-" if name != "teacher" else "k--",
                label=name)
    ax.set_xticks(range(len(keys)), [f"targets {k}" for k in keys], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("token perplexity (log scale)")
    ax.set_title(f"WikiText-2, {result['docs']} articles: loss by how far into the article", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
