"""Registers and spills of the fused Liger forward kernels per tile config, compiled offline for sm_90a (no GPU).

    python benchmarks/liger_fused_spills.py [--D 64 128 256] [--BT 32 64] [--BV 32 64 128] [--GP 1 4] [--warps 4 8]
        [--stages 1 2] [--strong 0 1] [--kernel o local seq]

Compiles the phase-2 kernel ``liger_fwd_kernel_o`` (both compilations: fast and strong-gate path) and the phase-1
kernels ``liger_fwd_kernel_local`` and ``liger_fwd_kernel_states_seq`` (``seq``) with triton's own ptxas (bf16
inputs, positions on, window 64) and prints ``ptxas -v``'s spill and register lines: how ``fused.BLOCKS``,
``LOCAL_BLOCKS`` and ``SEQ_BLOCKS`` were picked. Spills are a proxy only; the timing on the card decides
(``benchmarks/kernels.py --ops liger_fused``, ``LIGERFX_LIGER_BLOCKS`` to try tiles).
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
FLOATS = ("qk_scale", "mix", "inv_norm")


def compile_report(kernel, D, BT, BV, GP, warps, stages=1, strong=False, G=4, window=64, dt="bf16", prec="tf32"):
    if kernel == "o":
        fn = fused.liger_fwd_kernel_o.fn
        ptrs = {"q_pre": dt, "k_pre": dt, "gate": dt, "v": dt, "q_rope": dt, "k_rope": dt, "pos": "i64",
                "h": "fp32", "dec": "fp32", "o": dt, "lse": "fp32"}
        consts = dict(NW=triton.cdiv(window, BT), G=G, GP=GP, K=D, V=D, BT=BT, BC=fused.BC, BK=D, BV=BV,
                      HAS_POS=True, GLA_F32=dt != "bf16", PREC=prec, STRONG=strong)
    elif kernel == "local":
        fn = fused.liger_fwd_kernel_local.fn
        ptrs = {"k_pre": dt, "gate": dt, "v": dt, "pos": "i64", "hl": "fp32", "dec": "fp32"}
        consts = dict(K=D, V=D, BT=BT, BK=D, BV=BV, HAS_POS=True, PREC=prec)
    else:
        fn = fused.liger_fwd_kernel_states_seq.fn
        ptrs = {"k_pre": dt, "gate": dt, "v": dt, "pos": "i64", "h0": "fp32", "h": "fp32", "dec": "fp32",
                "ht": "fp32"}
        consts = dict(K=D, V=D, BT=BT, BK=D, BV=BV, HAS_POS=True, USE_H0=True, PREC=prec)
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in consts:
            sig[name], const[name] = "constexpr", consts[name]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
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
    ap.add_argument("--kernel", nargs="+", default=["o", "local"], choices=["o", "local", "seq"])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--BT", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--BV", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--GP", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--strong", type=int, nargs="+", default=[0, 1], help="phase-2 compilations: 0 fast, 1 strong")
    args = ap.parse_args()
    for kern, D, BT, BV, w, s in itertools.product(args.kernel, args.D, args.BT, args.BV, args.warps, args.stages):
        if BV > D:
            continue
        runs = [(GP, strong) for GP in args.GP for strong in map(bool, args.strong)] if kern == "o" else [(1, False)]
        for GP, strong in runs:
            tag = f"{kern} D={D} BT={BT} BV={BV} warps={w} stages={s}" + (f" GP={GP} strong={int(strong)}"
                                                                         if kern == "o" else "")
            try:
                print(f"{tag}: {compile_report(kern, D, BT, BV, GP, w, s, strong)}", flush=True)
            except Exception as e:  # keep going
                print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
