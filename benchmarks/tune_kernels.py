"""Tune the launch configs (num_warps x num_stages) of every ligerfx Triton kernel on this GPU; store the picks.

    TRITON_INTERPRET=0 python benchmarks/tune_kernels.py                     # D 256 128 64 at T 8192, all ops
    CUDA_VISIBLE_DEVICES=1 python benchmarks/tune_kernels.py --D 128 --out /tmp/d128.json   # one D per GPU, then:
    python benchmarks/tune_kernels.py --merge /tmp/d256.json /tmp/d128.json /tmp/d64.json --out <table>

Tuning costs every config's compile and timing (about 20 s per kernel and launch key on an H200: minutes per head
dim), so spread head dims over GPUs and merge; ops run in ``OPS`` order (the models' path first) and the table is
saved after each, so a time limit keeps the most useful part.

Runs each op once per shape with ``LIGERFX_AUTOTUNE=1`` (Triton's autotuner times every config of every kernel
launched; in-place kernels restore their buffers between timed runs), on the inputs of ``benchmarks/kernels.py``: the
GLA and window ops with their benchmark dtypes, the fused Liger op, and ``liger.liger_attention`` (the path the
linearized models take: fp32 gates and feature-map sums, so other launch keys). Writes
``ligerfx/kernels/tuned/<card>-triton<version>.json``: per kernel, the launch key (tuning-key arguments + tensor
dtypes, ``_Launcher.launch_key``) and the picked ``num_warps`` / ``num_stages``. ``ligerfx`` then launches with these
on the same card and Triton version, for launches with the same key (``LIGERFX_TUNED=0`` turns it off; any other
launch keeps the kernel file's default). An existing file for the same card and version is merged into (new picks
win). Prints one row per (kernel, key): default -> tuned.

Check a table before committing it: ``pytest tests/gpu`` (uses it: same card) and ``benchmarks/kernels.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

os.environ["LIGERFX_AUTOTUNE"] = "1"
os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import make_ops  # noqa: E402

from ligerfx.kernels import utils  # noqa: E402

# in this order: the models' path first (liger.liger_attention: fp32 gates, so its own launch keys), then the
# benchmark's GLA and window ops, then the fused op (not used by the models)
OPS = ("liger_unfused", "gla", "swa", "liger_fused")


def table_path(card: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    return os.path.join(utils.TUNED_DIR, f"{slug}-triton{triton.__version__}.json")


def collect() -> dict:
    """``{kernel: [{"key": [...], "num_warps", "num_stages", "default": [warps, stages]}]}`` from this process."""
    out = {}
    for name, launcher in sorted(utils.LAUNCHERS.items()):
        rows = []
        for key, (cfg, default) in launcher.picks.items():
            rows.append({"key": list(key), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                         "default": [default.num_warps, default.num_stages]})
        if rows:
            out[name] = rows
    return out


def merge(old: dict, new: dict) -> dict:
    merged = {k: {tuple(e["key"]): e for e in v} for k, v in old.items()}
    for k, v in new.items():
        merged.setdefault(k, {}).update({tuple(e["key"]): e for e in v})
    return {k: list(v.values()) for k, v in sorted(merged.items())}


def write(out: str, card: str, argv, kernels: dict) -> dict:
    """Merge ``kernels`` into ``out`` (kept when it is for this card and Triton version) and write it atomically."""
    old = {}
    if os.path.exists(out):
        with open(out) as f:
            prev = json.load(f)
        if prev.get("card") == card and prev.get("triton") == triton.__version__:
            old = prev["kernels"]
    data = {"card": card, "triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "command": "python benchmarks/tune_kernels.py " + " ".join(argv), "kernels": merge(old, kernels)}
    dump(out, data)
    return data


def dump(out: str, data: dict) -> None:
    """Write a table atomically (a run cut short never leaves half a file), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(out + ".tmp", out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--D", type=int, nargs="+", default=[256, 128, 64])
    ap.add_argument("--T", type=int, nargs="+", default=[8192])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--out", default=None, help="JSON file [ligerfx/kernels/tuned/<card>-triton<version>.json]")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no tuning: merge these tables (same card and Triton version) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        first = json.load(open(args.merge[0]))
        tables = [json.load(open(f)) for f in args.merge]
        if any((t["card"], t["triton"]) != (first["card"], first["triton"]) for t in tables):
            sys.exit("--merge: the tables come from different cards or Triton versions")
        kernels = {}
        for t in tables:
            kernels = merge(kernels, t["kernels"])
        data = {**first, "command": " + ".join(t["command"] for t in tables), "kernels": kernels}
        out = args.out or args.merge[0]
        dump(out, data)
        print(f"merged {len(tables)} tables -> {out} ({sum(len(v) for v in kernels.values())} launch keys)")
        return
    if not torch.cuda.is_available():
        sys.exit("tune_kernels.py needs a CUDA GPU (the autotuner times kernels on it)")
    card = torch.cuda.get_device_name()
    out = args.out or table_path(card)
    print(f"card {card}; triton {triton.__version__}; torch {torch.__version__}; -> {out}", flush=True)
    for D in args.D:  # the table is written after every op, so a run cut short keeps what it tuned
        for T in args.T:
            B = max(1, min(8, 16384 // T))
            ops, _ = make_ops(B, T, D)
            for op in [o for o in OPS if o in args.ops]:
                t0 = time.time()
                ops[(op, "fwd+bwd")]()  # the forward kernels are launched with the same keys as in "fwd"
                torch.cuda.synchronize()
                write(out, card, argv, collect())
                print(f"D={D} T={T} B={B} {op} fwd+bwd: tuned in {time.time() - t0:.0f} s", flush=True)
    kernels = collect()
    print(f"\n{'kernel':28} {'launch key':60} default -> tuned (warps, stages)")
    for name, rows in kernels.items():
        for e in rows:
            mark = "" if e["default"] == [e["num_warps"], e["num_stages"]] else "  *"
            print(f"{name:28} {str(tuple(e['key'])):60} {tuple(e['default'])} -> "
                  f"({e['num_warps']}, {e['num_stages']}){mark}")
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
