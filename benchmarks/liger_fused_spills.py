"""Registers and spills of the fused Liger forward kernel per tile config, compiled offline for sm_90a (no GPU).

    python benchmarks/liger_fused_spills.py [--D 64 128 256] [--BT 16 32 64] [--BV 32 64 128] [--GP 1 4] [--warps 8]

Compiles ``liger_fwd_kernel`` with triton's own ptxas (bf16 inputs, positions and h0 on, G = 4 query heads per KV
head) and prints ``ptxas -v``'s spill and register lines: how ``fused.BLOCKS`` was picked. Spills are a proxy only;
the timing on the card decides (``benchmarks/kernels.py --ops liger_fused``, ``LIGERFX_LIGER_BLOCKS`` to try tiles).
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ligerfx.kernels.liger import fused  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def compile_report(D, BT, BV, GP, warps, stages=1, G=4, dt="bf16", prec="tf32"):
    fn = fused.liger_fwd_kernel.fn
    ptrs = {"q_pre": dt, "k_pre": dt, "gate": dt, "v": dt, "q_rope": dt, "k_rope": dt, "pos": "i64", "h0": "fp32",
            "o": dt, "ht": "fp32", "lse": "fp32", "sk": "fp32", "sc": "fp32"}
    consts = dict(G=G, GP=GP, K=D, V=D, BT=BT, BC=fused.BC, BK=D, BV=BV, HAS_POS=True, USE_H0=True, PREC=prec)
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in consts:
            sig[name], const[name] = "constexpr", consts[name]
        else:
            sig[name] = "fp32" if name in ("qk_scale", "mix", "inv_norm") else "i32"
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(k.asm["ptx"])
        err = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"], capture_output=True,
                             text=True).stderr
    lines = [line.split(":", 1)[-1].strip() for line in err.splitlines() if "spill" in line or "Used" in line]
    return " | ".join(lines) + f" | shared {k.metadata.shared} B"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--BT", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--BV", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--GP", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[8])
    args = ap.parse_args()
    for D, BT, BV, GP, w in itertools.product(args.D, args.BT, args.BV, args.GP, args.warps):
        if BV > D:
            continue
        try:
            print(f"D={D} BT={BT} BV={BV} GP={GP} warps={w}: {compile_report(D, BT, BV, GP, w)}", flush=True)
        except Exception as e:  # keep going
            print(f"D={D} BT={BT} BV={BV} GP={GP} warps={w}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
