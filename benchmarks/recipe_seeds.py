"""Seed spread of trained recipes against the training-free sink baseline: one table, one JSON, one figure.

    python benchmarks/recipe_seeds.py docs/results/quality \
        --group "0.5M tok, lr 3e-4=complementary_s14_c05m_s*" --group "1M tok, lr 3e-4=complementary_s14_c1m_s*" \
        --out docs/results/complementary_seeds.json --plot docs/results/complementary_seeds.png

Each ``--group LABEL=GLOB[,GLOB...]`` collects ``<folder>/recipes/GLOB.json`` (one ``ligerfx eval`` report per seed). For every
task it prints the mean over the seeds that scored the task, the per-seed minimum and maximum, and the difference of
the mean to ``<folder>/swa_sinks.json`` (the target of docs/RESULTS.md: above the sink baseline on every task). A
single run is one draw: the seeds show how far a recipe's score moves by chance alone, which is what a claim of
"above the baseline" has to beat.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_table import METRIC  # noqa: E402  (task -> the metric the report uses)


def collect(folder: Path, groups: list[tuple[str, str]]) -> dict:
    base_r = json.loads((folder / "swa_sinks.json").read_text())["tasks"]
    base = {t: base_r[t][m] for t, m in METRIC.items()}
    out = {"baseline": "swa_sinks", "baseline_tasks": {t: round(v, 2) for t, v in base.items()}, "groups": {}}
    for label, pattern in groups:
        files = sorted({f for pat in pattern.split(",") for f in (folder / "recipes").glob(pat.strip() + ".json")})
        if not files:
            raise SystemExit(f"--group {label}={pattern}: no file matches {folder / 'recipes' / (pattern + '.json')}")
        runs = {f.stem: json.loads(f.read_text())["tasks"] for f in files}
        g = {"runs": sorted(runs), "tasks": {}}
        for t, m in METRIC.items():
            vals = [r[t][m] for r in runs.values() if t in r]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            g["tasks"][t] = {"n_seeds": len(vals), "mean": round(mean, 2), "min": round(min(vals), 2),
                             "max": round(max(vals), 2), "mean_minus_baseline": round(mean - base[t], 2),
                             "seeds_above_baseline": sum(v > base[t] for v in vals),
                             "per_seed": {k: round(r[t][m], 2) for k, r in runs.items() if t in r}}
        g["tasks_mean_above_baseline"] = sum(v["mean_minus_baseline"] > 0 for v in g["tasks"].values())
        out["groups"][label] = g
    return out


def table(out: dict) -> str:
    lines = ["| recipe (seeds) | " + " | ".join(METRIC) + " |", "|---|" + "---:|" * len(METRIC)]
    b = out["baseline_tasks"]
    lines.append("| swa_sinks (training-free) | " + " | ".join(f"{b[t]:.2f}" for t in METRIC) + " |")
    for label, g in out["groups"].items():
        cells = []
        for t in METRIC:
            c = g["tasks"].get(t)
            cells.append("–" if c is None else
                         f"{c['mean']:.2f} ({c['mean_minus_baseline']:+.2f}; {c['min']:.2f}–{c['max']:.2f})")
        n = max(c["n_seeds"] for c in g["tasks"].values())
        lines.append(f"| {label} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(METRIC)
    groups = list(out["groups"].items())
    fig, ax = plt.subplots(figsize=(12, 4.8))
    w = 0.8 / max(len(groups), 1)
    for k, (label, g) in enumerate(groups):
        color = f"C{k}"
        for j, t in enumerate(names):
            c = g["tasks"].get(t)
            if c is None:
                continue
            x = j + (k - (len(groups) - 1) / 2) * w
            ax.bar(x, c["mean_minus_baseline"], w * 0.9, color=color, alpha=0.35,
                   label=label if j == 0 else None)
            base = out["baseline_tasks"][t]
            ys = [v - base for v in c["per_seed"].values()]
            ax.plot([x] * len(ys), ys, "o", color=color, ms=3.5)
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(len(names)), [f"{t}\n({METRIC[t]})" for t in names], fontsize=8)
    ax.set_ylabel("points above swa_sinks (bar: seed mean, dots: seeds)")
    ax.set_title("trained recipes vs the training-free sink baseline, seed by seed (target: > 0 on every task)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--group", action="append", required=True, metavar="LABEL=GLOB",
                   help="a recipe's reports: LABEL=GLOB over <folder>/recipes/GLOB.json (repeatable)")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--plot", default=None, help="PNG path")
    args = p.parse_args(argv)
    groups = []
    for spec in args.group:
        if "=" not in spec:
            raise SystemExit(f"--group {spec!r}: expected LABEL=GLOB")
        label, pattern = spec.rsplit("=", 1)
        groups.append((label.strip(), pattern.strip()))
    out = collect(args.folder, groups)
    print(table(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        plot(out, args.plot)
        print(f"wrote {args.plot}")
    return out


if __name__ == "__main__":
    main()
