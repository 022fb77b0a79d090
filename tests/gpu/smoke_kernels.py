"""Run every Triton kernel once at small shapes, synchronising after each op (for compute-sanitizer).

    TRITON_INTERPRET=0 compute-sanitizer --tool memcheck python tests/gpu/smoke_kernels.py --D 64 128 --G 1 4
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ligerfx.kernels.gla import chunk, recurrent  # noqa: E402
from ligerfx.kernels.swa import window  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--G", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    for D in args.D:
        for G in args.G:
            B, HKV, T = 2, 2, args.T
            q = torch.randn(B, HKV * G, T, D, device="cuda").softmax(-1).to(dt)
            k = torch.randn(B, HKV, T, D, device="cuda").softmax(-1).to(dt)
            v = torch.randn(B, HKV, T, D, device="cuda", dtype=dt)
            g = (F.logsigmoid(torch.randn(B, HKV, T, D, device="cuda")) / 16).to(dt)
            pos = torch.arange(T, device="cuda").expand(B, T).contiguous()
            steps = [
                ("gla fwd", lambda: chunk.chunk_gla_fwd(q, k, v, g, None)),
                ("gla bwd", lambda: chunk.chunk_gla_bwd(q, k, v, g, None, torch.randn(B, HKV * G, T, D, device="cuda"),
                                                        None)),
                ("gla recurrent", lambda: recurrent.recurrent_gla_fwd(q[:, :, :3], k[:, :, :3], v[:, :, :3],
                                                                      g[:, :, :3], None)),
                ("swa fwd+bwd", lambda: window.swa_bwd(q, k, v, pos, pos, *window.swa_fwd(q, k, v, pos, pos, 0.1, 64,
                                                                                          4), q, 0.1, 64, 4)),
            ]
            for name, fn in steps:
                fn()
                torch.cuda.synchronize()
                print(f"ok D={D} G={G} {name}", flush=True)


if __name__ == "__main__":
    main()
