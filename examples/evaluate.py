"""Teacher vs. linearized model, side by side, with lm-eval-harness on the local data sets.

    python examples/evaluate.py --limit 50                       # Gemma-3-270M teacher vs Liger GLA (mix 0.5)
    python examples/evaluate.py --variant swa_sinks --tasks piqa,arc_easy --limit 100
    python examples/evaluate.py --model path/to/hf_dir --adapter runs/lora/adapter

The same numbers come from the CLI, one model at a time: ``ligerfx eval --model gemma-3-270m [--variant gla ...]``.
Writes ``<out>/teacher.{json,md}``, ``<out>/student.{json,md}`` and ``<out>/comparison.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ligerfx
from ligerfx.evaluation import harness
from ligerfx.evaluation.tasks import DEFAULT_TASKS, MAIN_METRIC, default_data_dir
from ligerfx.models import load_model


def evaluate(model, tok, label, args, meta):
    t0 = time.time()
    out = harness.run_lm_eval(model, tok, args.tasks, data_dir=args.data_dir, limit=args.limit,
                              batch_size=args.batch_size)
    report = {"label": label, "model": meta, "limit": args.limit, "environment": harness.environment(),
              "tasks": harness.summarize(out), "lm_eval_seconds": time.time() - t0}
    report["generation"] = harness.lambada_generate(model, tok, data_dir=args.data_dir, limit=args.gen_limit)
    report["decode_consistency"] = harness.decode_consistency(model, tok, data_dir=args.data_dir, n_texts=2)
    harness.write_report(report, args.out, stem=label)
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,lambada_openai")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--gen-limit", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variant", default="gla", choices=("gla", "swa_sinks"))
    p.add_argument("--mix", type=float, default=0.5)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--adapter", default=None, help="LoRA adapter dir for the linearized model")
    p.add_argument("--out", default="runs/evaluate-example")
    args = p.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    assert all(t in DEFAULT_TASKS for t in args.tasks), args.tasks
    torch.manual_seed(0)

    model, tok = load_model(args.model, dtype=args.dtype)
    teacher = evaluate(model, tok, "teacher", args, {"spec": args.model})

    cfg = ligerfx.LigerConfig(variant=args.variant, mix=args.mix, window=args.window)
    model = ligerfx.transform(model, passes=["linearize"], config=cfg)  # in place
    meta = {"spec": args.model, "transform": cfg.to_dict()}
    if args.adapter:
        from ligerfx.adapters import load_adapter

        model = load_adapter(model, args.adapter) or model
        meta["adapter"] = args.adapter
    student = evaluate(model.eval(), tok, "student", args, meta)

    rows = ["| task | metric | teacher | student | Δ |", "|---|---|---:|---:|---:|"]
    for task in args.tasks:
        m = MAIN_METRIC[task]
        a, b = teacher["tasks"][task].get(m), student["tasks"][task].get(m)
        rows.append(f"| {task} | {m} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    for key in ("acc_token", "acc_word"):
        a, b = teacher["generation"][key], student["generation"][key]
        rows.append(f"| lambada (generate) | {key} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    for key in ("max_abs_diff", "mean_abs_diff"):
        a, b = teacher["decode_consistency"][key], student["decode_consistency"][key]
        rows.append(f"| decode vs forward | {key} | {a:.3g} | {b:.3g} | |")
    table = f"limit {args.limit}, {json.dumps(cfg.to_dict())}\n\n" + "\n".join(rows) + "\n"
    (Path(args.out) / "comparison.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
