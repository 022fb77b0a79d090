"""How far each linearized layer's attention output drifts from the softmax teacher's, on LAMBADA passages.

For every variant (a transform and/or an adapter, given as ``ligerfx eval`` flags) and every LAMBADA item, the same
tokens (context + target word) go through the teacher (``ligerfx.teacher_mode``, LoRA off: the original model) and
through the variant, and a forward hook on every linearized attention module records its output. Per layer l::

    drift_l = ||o_student - o_teacher||^2 / ||o_teacher||^2     at the positions that predict the target word

(per item, the ratio of sums over those positions; ``ligerfx train --attn-transfer`` optimizes the same error per
token relative to the mean over tokens, averaged over layers), averaged over the items of
each LAMBADA bucket of ``ligerfx eval --checks lambada_distance`` (near: the word was last seen <= 60 tokens back,
far, absent). Each item's teacher-forced greedy hit (lm-eval's ``acc``) is recorded too, so drift and accuracy come
from the same forwards. Writes a JSON and a PNG (drift per layer, one line per variant, one panel per bucket).

    python benchmarks/layer_drift.py --model gemma-3-270m --limit 300 --device cpu --dtype float32 \\
        --variant "untrained+sinks=--variant gla --sinks 4" --variant "lora-vo=--adapter runs/vo/checkpoint-181" \\
        --out docs/results/quality/checks/layer_drift_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ligerfx.evaluation import cli as eval_cli  # noqa: E402
from ligerfx.evaluation.harness import _lambada_items, default_data_dir, distance_bucket  # noqa: E402
from ligerfx.training.trainer import attention_outputs  # noqa: E402

BUCKETS = ("near", "far", "absent")


def parse_variant(spec: str, common: list, allow_teacher: bool = False) -> tuple[str, argparse.Namespace]:
    """``"name=--flag value ..."`` -> (name, the namespace ``ligerfx eval`` would build from those flags). Without
    ``allow_teacher``, flags that transform nothing (no ``--variant``, no ``--adapter``) are an error."""
    name, sep, flags = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME=FLAGS, e.g. 'sinks=--variant gla --sinks 4'")
    p = argparse.ArgumentParser(prog=f"--variant {name}")
    eval_cli.add_arguments(p)
    args = p.parse_args(common + shlex.split(flags))
    if not allow_teacher and args.variant is None and not args.adapter:
        raise SystemExit(f"--variant {name}: give --variant and/or --adapter (the teacher is the reference)")
    return name, args


@torch.no_grad()
def drift(model, tok, items: list, near: int) -> dict:
    import ligerfx
    from ligerfx.adapters import lora_disabled

    n_layers = sum(hasattr(m, "_ligerfx") for m in model.modules())
    if not n_layers:
        raise SystemExit("the variant has no linearized attention module")
    dev = next(model.parameters()).device
    per = {b: {"n": 0, "hits": 0, "drift": torch.zeros(n_layers, dtype=torch.float64)} for b in BUCKETS}
    for it in items:
        ctx = tok(it["context"]).input_ids
        tgt = tok(" " + it["continuation"], add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + tgt], device=dev)
        sl = slice(len(ctx) - 1, ids.shape[1] - 1)  # the positions that predict the target's tokens
        t_outs, s_outs = [], []  # the recorder of `ligerfx train --attn-transfer`
        with ligerfx.teacher_mode(model), lora_disabled(model), attention_outputs(model, t_outs):
            model(input_ids=ids, use_cache=False)
        with attention_outputs(model, s_outs):
            logits = model(input_ids=ids, use_cache=False).logits
        d = torch.tensor([((s[0, sl].double() - t[0, sl].double()) ** 2).sum().item()
                          / max((t[0, sl].double() ** 2).sum().item(), 1e-30) for s, t in zip(s_outs, t_outs)],
                         dtype=torch.float64)
        b = per[distance_bucket(tok, it, near)]
        b["n"] += 1
        b["hits"] += bool((logits[0, sl].argmax(-1) == ids[0, len(ctx):]).all())
        b["drift"] += d
    out = {}
    for name, b in per.items():
        n = max(b["n"], 1)
        layers = (b["drift"] / n).tolist()
        out[name] = {"n": b["n"], "acc": 100.0 * b["hits"] / n if b["n"] else None,
                     "drift_per_layer": layers, "drift_mean": sum(layers) / len(layers)}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUCKETS), figsize=(5 * len(BUCKETS), 4), sharey=True, dpi=110)
    for ax, b in zip(axes, BUCKETS):
        for name, v in result["variants"].items():
            r = v["buckets"][b]
            if r["n"]:
                ax.plot(range(len(r["drift_per_layer"])), r["drift_per_layer"], marker="o", ms=3,
                        label=f"{name} (acc {r['acc']:.1f})")
        n = next(iter(result["variants"].values()))["buckets"][b]["n"]
        ax.set_title(f"{b} items (n={n})", fontsize=10)
        ax.set_xlabel("linearized layer")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("||o - o_teacher||² / ||o_teacher||² at the target positions")
    fig.suptitle(f"{result['model']}: attention-output drift from the softmax teacher on LAMBADA "
                 f"(first {result['limit']} items)", fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=300, help="first N LAMBADA items [300]")
    ap.add_argument("--near", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                    help="a model to compare, as ligerfx eval flags (repeatable)")
    ap.add_argument("--out", required=True, help="JSON path; the PNG goes beside it")
    args = ap.parse_args(argv)
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    variants = [parse_variant(v, common) for v in args.variant]  # all flags checked before any model is loaded
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    items = _lambada_items(data_dir, args.limit)
    result = {"model": args.model, "limit": args.limit, "near": args.near, "device": args.device, "dtype": args.dtype,
              "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/layer_drift.py " + shlex.join(
                  sys.argv[1:] if argv is None else argv), "variants": {}}
    for name, vargs in variants:
        t0 = time.time()
        model, tok, meta = eval_cli.build_model(vargs)
        model.eval()
        buckets = drift(model, tok, items, args.near)
        result["variants"][name] = {"meta": meta, "seconds": round(time.time() - t0, 1), "buckets": buckets}
        row = "  ".join(f"{b} n={r['n']} acc={r['acc'] if r['acc'] is None else round(r['acc'], 1)} "
                        f"drift={r['drift_mean']:.4f}" for b, r in buckets.items())
        print(f"{name}: {row}", flush=True)
        del model
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:  # after every variant: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
