"""Paired, item-level comparison of two `ligerfx eval` runs on the same tasks: is B above A, below, or neither?

    ligerfx eval ... --log-samples --out runs/A      # each run writes <out>/samples/<task>.jsonl
    ligerfx eval ... --log-samples --out runs/B
    python benchmarks/paired.py runs/A runs/B [--label-a swa_sinks --label-b ligerfx] [--out paired.json]
        [--plot paired.png] [--iters 10000] [--seed 0] [--alpha 0.05]

Both runs score the same documents, so the right test is paired: only the items the two models answer differently
carry information. Per task (metric: acc, acc_norm for ARC-Challenge and HellaSwag, as in the quality table):

* ``b_only`` / ``a_only``: items only B / only A gets right; ``diff`` = B - A in points (= (b_only - a_only) / n).
* ``p``: exact two-sided McNemar test (binomial on the discordant items, p = 0.5 under "no difference").
* ``ci``: 95 % paired-bootstrap interval of ``diff`` (items resampled with replacement, both models together).
* ``items_needed``: how many more items B would have to win than A, with these discordant items, for p < alpha:
  the resolution of the task for this pair of models.
* ``verdict``: "B above" / "B below" at p < alpha, else "no detectable difference".

Writes a markdown table to stdout, the JSON (``--out``) and a figure (``--plot``): each task's difference with its
interval. An item present in one run and not the other is an error naming the task and the counts.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
          "winogrande": "acc", "lambada_openai": "acc"}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: P(a result at least this lopsided) under Binomial(a_only + b_only, 1/2)."""
    d, k = a_only + b_only, min(a_only, b_only)
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, i) for i in range(k + 1)) / 2.0 ** d
    return min(1.0, 2.0 * tail)


def items_needed(discordant: int, alpha: float = 0.05) -> int:
    """Smallest lead ``b_only - a_only`` (same number of discordant items) with p < alpha; discordant + 1 if none."""
    for lead in range(discordant % 2, discordant + 1, 2):
        lo = (discordant - lead) // 2
        if mcnemar_exact(lo, discordant - lo) < alpha:
            return lead
    return discordant + 1


def load_items(run: Path, task: str) -> dict:
    p = Path(run) / "samples" / f"{task}.jsonl"
    if not p.is_file():
        raise SystemExit(f"paired.py: {p} not found (run `ligerfx eval` with --log-samples)")
    metric = METRIC.get(task, "acc")
    out = {}
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if metric not in r:
                raise SystemExit(f"paired.py: {p}:{line_no} has no '{metric}' (keys: {sorted(r)})")
            out[int(r["doc_id"])] = float(r[metric])
    return out


def compare_task(a: dict, b: dict, task: str, iters: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict:
    import numpy as np

    if set(a) != set(b):
        raise SystemExit(f"paired.py: {task}: the runs scored different items ({len(a)} vs {len(b)}, "
                         f"{len(set(a) ^ set(b))} not in both)")
    ids = sorted(a)
    xa = np.array([a[i] for i in ids], dtype=np.float64)
    xb = np.array([b[i] for i in ids], dtype=np.float64)
    n = len(ids)
    a_only, b_only = int(((xa > 0.5) & (xb < 0.5)).sum()), int(((xb > 0.5) & (xa < 0.5)).sum())
    d = xb - xa
    rng = np.random.default_rng(seed)
    boots = np.empty(iters)
    for s in range(0, iters, 1000):  # chunks keep memory flat for HellaSwag-sized tasks
        m = min(1000, iters - s)
        boots[s:s + m] = d[rng.integers(0, n, size=(m, n))].mean(1)
    lo, hi = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = mcnemar_exact(a_only, b_only)
    verdict = "no detectable difference"
    if p < alpha:
        verdict = "B above" if b_only > a_only else "B below"
    return {"task": task, "metric": METRIC.get(task, "acc"), "n": n, "a": 100 * xa.mean(), "b": 100 * xb.mean(),
            "diff": 100 * d.mean(), "a_only": a_only, "b_only": b_only, "p": p,
            "ci": [100 * float(lo), 100 * float(hi)], "items_needed": items_needed(a_only + b_only, alpha),
            "verdict": verdict}


def markdown(rows, label_a: str, label_b: str, alpha: float) -> str:
    lines = [f"| task | metric | n | {label_a} | {label_b} | diff (pts) | 95% CI | only {label_a} | only {label_b} "
             f"| McNemar p | lead needed for p<{alpha} | verdict |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        v = r["verdict"].replace("B ", f"{label_b} ")
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} "
                     f"| [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] | {r['a_only']} | {r['b_only']} | {r['p']:.3f} "
                     f"| {r['items_needed']} | {v} |")
    return "\n".join(lines) + "\n"


def plot(rows, label_a: str, label_b: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    for i, r in enumerate(reversed(rows)):
        color = {"B above": "tab:green", "B below": "tab:red"}.get(r["verdict"], "tab:gray")
        ax.plot(r["ci"], [i, i], color=color, lw=2)
        ax.plot([r["diff"]], [i], "o", color=color)
        pv = "p<0.001" if r["p"] < 0.001 else f"p={r['p']:.3f}"
        ax.text(max(r["ci"][1], 0) + 0.1, i, f"{pv}  ({r['b_only']} vs {r['a_only']} items)",
                va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["task"] for r in reversed(rows)])
    ax.set_xlabel(f"{label_b} - {label_a} (points), 95% paired-bootstrap interval")
    ax.set_title(f"{label_b} vs {label_a}, item by item\n(green/red: exact McNemar p < 0.05; grey: no detectable "
                 "difference)", fontsize=9)
    lo = min(r["ci"][0] for r in rows)
    hi = max(r["ci"][1] for r in rows)
    ax.set_xlim(min(lo, 0) - 0.5, max(hi, 0) + 3.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--label-a", default=None)
    ap.add_argument("--label-b", default=None)
    ap.add_argument("--tasks", default=None, help="comma list (default: every task with samples in both runs)")
    ap.add_argument("--iters", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    label_a = args.label_a or args.run_a.name
    label_b = args.label_b or args.run_b.name
    if args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
    else:
        have = lambda run: {p.stem for p in (run / "samples").glob("*.jsonl")}  # noqa: E731
        tasks = [t for t in METRIC if t in have(args.run_a) & have(args.run_b)]
        if not tasks:
            raise SystemExit(f"paired.py: no task has samples in both {args.run_a} and {args.run_b}")
    rows = [compare_task(load_items(args.run_a, t), load_items(args.run_b, t), t, args.iters, args.seed, args.alpha)
            for t in tasks]
    sys.stdout.write(markdown(rows, label_a, label_b, args.alpha))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"a": label_a, "b": label_b, "run_a": str(args.run_a),
                                        "run_b": str(args.run_b), "alpha": args.alpha, "iters": args.iters,
                                        "seed": args.seed, "tasks": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, label_a, label_b, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
