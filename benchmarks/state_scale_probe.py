"""How much does the complementary variant's recurrent state weigh, and would it help to weigh it more? (CPU probe)

    python benchmarks/state_scale_probe.py [--model gemma-3-270m] [--adapter examples/adapters/gemma-3-270m-liger-complementary]
        [--scales 1,4,16,64] [--far 200] [--near 100] [--data-dir ../shared/data] [--out probe.json]

In ``variant="complementary"`` the window (+ sinks) gets a softmax mass of 1 and every token that has left it the GLA
weight ``w_tj = phi(q_t) . (gates) phi(k_j)``: ``o = (o_swa + sum_j w_tj v_j) / (1 + sum_j w_tj)``
(``ligerfx/liger.py``). This probe, training-free, replaces that combination by
``(o_swa + c * sum_j w_tj v_j) / (1 + c * sum_j w_tj)`` for each ``c`` in ``--scales`` (``c = 1`` is the model as
it is) and scores LAMBADA items (lm-eval's ``acc``: every greedy token of the target word right, one uncached
forward per item) drawn at random (seed 0) from the "far" and "near" buckets of
``ligerfx.evaluation.harness.distance_bucket`` (the word's last mention more / at most 60 tokens before the end of
the context). It also reports the mean of ``sum_j w_tj`` over every layer, head and position of those forwards: the
state's total weight next to the window's 1.

``--variant``/``--window`` etc. as in ``ligerfx eval`` when no ``--adapter`` carries a config. Writes a JSON and
prints a table; a "far" or "near" sample larger than its bucket takes the whole bucket.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ligerfx import liger  # noqa: E402
from ligerfx.evaluation import cli as eval_cli, harness  # noqa: E402


class ScaledCombine:
    """Stands in for ``liger.combine_complementary`` with the state's weights scaled by ``c``; records the mean
    normaliser mass ``sum_j w_tj`` of every call."""

    def __init__(self):
        self.c = 1.0
        self.masses = []

    def __call__(self, o_swa, o_out, dtype):
        self.masses.append(o_out[..., -1].float().mean().item())
        c = self.c
        return ((o_swa.float() + c * o_out[..., :-1]) / (1.0 + c * o_out[..., -1:])).to(dtype)


@torch.no_grad()
def score_item(model, tok, it) -> tuple:
    """(all greedy target tokens right, sum of the target tokens' log-probabilities), one uncached forward."""
    ctx = tok(it["context"]).input_ids
    tgt = tok(" " + it["continuation"], add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + tgt], device=next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1].float()
    target = ids[0, len(ctx):]
    loglik = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return bool((logits.argmax(-1) == target).all()), loglik


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    eval_cli.add_arguments(ap)  # --model, --adapter, --variant, --window, --dtype, --device, --data-dir, --out ...
    ap.add_argument("--scales", default="1,4,16,64")
    ap.add_argument("--far", type=int, default=200)
    ap.add_argument("--near", type=int, default=100)
    ap.add_argument("--near-tokens", type=int, default=60)
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    if not scales or any(s < 0 for s in scales):
        raise SystemExit(f"--scales {args.scales}: need non-negative numbers")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tok, meta = eval_cli.build_model(args)
    if (meta.get("transform") or {}).get("variant") != "complementary":
        raise SystemExit(f"the model is not variant='complementary' (transform: {meta.get('transform')}); "
                         "give --adapter of a complementary model or --variant complementary")
    data_dir = Path(args.data_dir) if args.data_dir else harness.default_data_dir()
    items = harness._lambada_items(data_dir, None)
    buckets = [harness.distance_bucket(tok, it, args.near_tokens) for it in items]
    rng = random.Random(0)
    pick = {}
    for name, n in (("far", args.far), ("near", args.near)):
        pool = [i for i, b in enumerate(buckets) if b == name]
        pick[name] = sorted(rng.sample(pool, min(n, len(pool))))
    probe = ScaledCombine()
    original = liger.combine_complementary
    liger.combine_complementary = probe
    rows = []
    try:
        for c in scales:
            probe.c = c
            row = {"scale": c}
            for name, ids in pick.items():
                probe.masses = []
                t0 = time.time()
                scored = [score_item(model, tok, items[i]) for i in ids]
                ok = [s[0] for s in scored]
                row[name] = {"n": len(ids), "acc": 100.0 * sum(ok) / max(len(ids), 1),
                             "mean_state_mass": sum(probe.masses) / max(len(probe.masses), 1),
                             "per_item": ok, "loglik": [s[1] for s in scored], "seconds": round(time.time() - t0, 1)}
                print(f"[probe] c={c:g} {name}: {row[name]['acc']:.1f}% of {len(ids)}, mean state mass "
                      f"{row[name]['mean_state_mass']:.5f}", file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        liger.combine_complementary = original
    print("| state scale c | far acc | near acc | mean state mass (window = 1) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scale']:g} | {r['far']['acc']:.1f} ({r['far']['n']}) | {r['near']['acc']:.1f} "
              f"({r['near']['n']}) | {r['far']['mean_state_mass']:.5f} |")
    out = {"meta": meta, "items": pick, "rows": rows, "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
