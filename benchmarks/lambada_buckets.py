"""LAMBADA accuracy by how far back the target word was last mentioned, from per-item scores already computed.

    python benchmarks/lambada_buckets.py RUN [RUN ...] [--labels teacher,swa_sinks,...] [--data-dir ../shared/data]
        [--tokenizer gemma-3-270m] [--near 60] [--out buckets.json] [--plot buckets.png]

Each RUN is a ``ligerfx eval --log-samples`` output folder holding ``samples/lambada_openai.jsonl`` (lm-eval's
per-item ``acc``; ``doc_id`` = line of ``lambada_openai/lambada_openai_test.jsonl``). Every item goes to the bucket
``ligerfx.evaluation.harness.distance_bucket`` gives it (near: the last mention starts at most ``--near`` tokens
before the end of the context, so a 64-token window still sees it; far: further back; absent: never mentioned), the
same split as ``ligerfx eval --checks lambada_distance``, but over the full set and with no model run: the scores
are the ones the paired tests use. Per bucket and run: accuracy and count; against the first run, the items only
it / only the other gets right and the exact McNemar p (``benchmarks/paired.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired import load_items, mcnemar_exact  # noqa: E402

BUCKETS = ("near", "far", "absent")


def buckets_of(items: list, tokenizer, near: int) -> list:
    from ligerfx.evaluation.harness import distance_bucket

    return [distance_bucket(tokenizer, it, near) for it in items]


def table(runs: dict, buckets: list) -> dict:
    """``{label: {bucket: {"n", "acc", ...}}}``; pairs against the first label."""
    labels = list(runs)
    n_items = len(buckets)
    for lab, acc in runs.items():
        if set(acc) != set(range(n_items)):
            missing = sorted(set(range(n_items)) - set(acc))[:5]
            raise SystemExit(f"run {lab!r}: its LAMBADA samples do not cover the {n_items} items of the data file "
                             f"(first missing doc_ids: {missing}; extra: {len(set(acc) - set(range(n_items)))})")
    out = {}
    base = runs[labels[0]]
    for lab, acc in runs.items():
        row = {}
        for b in BUCKETS + ("all",):
            ids = [i for i in range(n_items) if b == "all" or buckets[i] == b]
            r = {"n": len(ids), "acc": 100.0 * sum(acc[i] for i in ids) / max(len(ids), 1)}
            if lab != labels[0]:
                a_only = sum(1 for i in ids if base[i] and not acc[i])
                b_only = sum(1 for i in ids if acc[i] and not base[i])
                r.update(only_first=a_only, only_this=b_only, p=mcnemar_exact(a_only, b_only))
            row[b] = r
        out[lab] = row
    return out


def markdown(res: dict) -> str:
    labels = list(res)
    first = labels[0]
    n = {b: res[first][b]["n"] for b in BUCKETS + ("all",)}
    lines = ["| model | " + " | ".join(f"{b} ({n[b]})" for b in ("all",) + BUCKETS) + " |",
             "|---|" + "---:|" * 4]
    for lab in labels:
        cells = []
        for b in ("all",) + BUCKETS:
            r = res[lab][b]
            c = f"{r['acc']:.2f}"
            if lab != first:
                c += f" ({r['only_first']}/{r['only_this']}, p={r['p']:.3f})"
            cells.append(c)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines.append(f"\n(in brackets: items only `{first}` / only this model gets right, exact McNemar p)")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    w = 0.8 / len(labels)
    for k, lab in enumerate(labels):
        xs = [i + (k - (len(labels) - 1) / 2) * w for i in range(len(BUCKETS) + 1)]
        ys = [res[lab][b]["acc"] for b in ("all",) + BUCKETS]
        ax.bar(xs, ys, width=w, label=lab)
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.5, f"{y:.1f}", ha="center", fontsize=7)
    first = labels[0]
    ax.set_xticks(range(len(BUCKETS) + 1),
                  [f"{b}\n({res[first][b]['n']} items)" for b in ("all",) + BUCKETS])
    ax.set_ylabel("LAMBADA accuracy (%)")
    ax.set_title("LAMBADA by where the target word was last mentioned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma list, one per run (default: folder names)")
    ap.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data relative to the repo")
    ap.add_argument("--tokenizer", default="gemma-3-270m", help="a ligerfx.models.load_tokenizer spec")
    ap.add_argument("--near", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    from ligerfx.evaluation.harness import _lambada_items
    from ligerfx.evaluation.tasks import default_data_dir
    from ligerfx.models import load_tokenizer

    items = _lambada_items(args.data_dir or default_data_dir(), None)
    tok = load_tokenizer(args.tokenizer)
    buckets = buckets_of(items, tok, args.near)
    runs = {lab: {i: bool(v) for i, v in load_items(run, "lambada_openai").items()}
            for lab, run in zip(labels, args.runs)}
    res = table(runs, buckets)
    print(markdown(res))
    out = {"near": args.near, "tokenizer": args.tokenizer, "runs": {lab: str(r) for lab, r in zip(labels, args.runs)},
           "buckets": res}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(res, args.plot)
    return out


if __name__ == "__main__":
    main()
