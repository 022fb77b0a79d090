"""Kernel benchmark: ligerfx GLA, SWA and their sum (Liger attention) against PyTorch SDPA (flash, causal).

    TRITON_INTERPRET=0 python benchmarks/kernels.py [--T 2048 8192 32768 65536] [--D 64 128 256] [--out FILE]
        [--ops gla swa liger liger_fused liger_unfused sdpa]

Run tests/gpu/test_kernels_gpu.py first: a speed number means nothing for a kernel that is wrong. Inputs are bf16,
head-first [B, H, T, D]; K = V = D; HQ query heads, HKV KV heads (GQA). B = max(1, 16384 // T), so B*T >= 16K tokens.
Times are ``triton.testing.do_bench`` medians (ms; L2 flushed between runs). "fwd+bwd" calls the host wrappers
(forward, then backward with a random ``do``); SDPA runs through autograd with k and v repeated to HQ heads outside the
timed region. "liger" = GLA + SWA (window 64) on the same q, k, v (the 0.5/0.5 mix is not included).
"liger_fused" = the whole Liger attention of a layer from the raw projections: ``kernels/liger/fused.py``'s
forward (chunk states, then one chunk-parallel kernel doing feature maps, gate, GLA, window and mix), and for fwd+bwd its backward (feature maps and gate
recomputed in PyTorch around the GLA and window backward kernels). "liger_unfused" = the same computation as
``liger.py`` composes it (PyTorch feature maps and gates, ``ligerfx::gla_fwd`` + ``ligerfx::swa_fwd``, mix), through
autograd for fwd+bwd: what liger_fused replaces.

HBM floor: the fewest bytes each op must move (every input read once, every output written once), over the
bandwidth measured by a device-to-device copy (bytes read + written). Per token, s = 2 (bf16)::

    gla fwd   s*(HQ*D + 3*HKV*D) + 4*HQ*D           read q, k, g, v; write o (fp32 by the op contract)
    gla bwd   4*HQ*D + s*(2*HQ*D + 6*HKV*D)          read do (fp32), q, k, v, g; write dq, dk, dv, dg
    swa fwd   s*(2*HQ*D + 2*HKV*D) + 4*HQ            read q, k, v; write o, lse
    swa bwd   s*(4*HQ*D + 4*HKV*D) + 4*HQ            read q, k, v, o, do, lse; write dq, dk, dv
    liger     gla + swa;   sdpa: as swa (its causal FLOPs, not bytes, bound it)
    liger_fused fwd  s*(3*HQ*D + 4*HKV*D) + 4*HQ      read q_pre, k_pre, gate, v, q_rope, k_rope once; write o, lse
    liger_fused bwd  s*(5*HQ*D + 8*HKV*D) + 4*HQ      read the six inputs, do, lse; write their six gradients
    liger_unfused    as liger_fused (same inputs and outputs; the floor does not depend on how it is computed)

fla (flash-linear-attention 0.6.0, a test-only peer: ``pip install --no-deps .carry/fla/*.whl``, see
docs/BENCHMARKS.md) is timed when it imports (``--no-fla`` skips it) on the same bf16 values: its ``chunk_gla`` has no
GQA, so k, v and g are repeated to every query head (as Liger's official code does) and all inputs are made
seq-first ``[B, T, H, D]`` contiguous *outside* the timed region; ``scale=1.0``, ``output_final_state=True``; fwd+bwd
through autograd with a random bf16 ``do`` (fla returns o in the input dtype). The window peer is fla's
``parallel_attn`` (GQA native, ``window_size = 65``: query i sees keys i-64..i like ours). Each row's ``fla_ms`` is the
matching fla time: gla rows fla ``chunk_gla``; swa rows ``parallel_attn``; liger, liger_fused and liger_unfused rows
``chunk_gla + parallel_attn`` (Liger composed of fla ops, mix excluded); null when fla is absent or failed at that
shape. ``fla_gla_ms`` / ``fla_swa_ms`` hold the two parts.

Rows written to ``benchmarks/results/kernels-<card>.json``: op, mode, T, B, H, HKV, D, ms, fla_ms, fla_gla_ms,
fla_swa_ms, ratio_to_fla (ms / fla_ms), sdpa_ms, hbm_floor_ms, pct_of_floor (floor / ms), ratio_to_sdpa
(ms / sdpa_ms), card, fla_version.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ligerfx import liger  # noqa: E402
from ligerfx.config import LigerConfig  # noqa: E402
from ligerfx.kernels.gla import chunk  # noqa: E402
from ligerfx.kernels.liger import fused  # noqa: E402
from ligerfx.kernels.swa import window as swa  # noqa: E402

WINDOW = 64
HEADS = {64: (32, 8), 128: (32, 8), 256: (16, 8)}  # D -> (HQ, HKV)


def floor_bytes(op, mode, HQ, HKV, D, s=2):
    gla_f = s * (HQ * D + 3 * HKV * D) + 4 * HQ * D
    gla_b = 4 * HQ * D + s * (2 * HQ * D + 6 * HKV * D)
    swa_f = s * (2 * HQ * D + 2 * HKV * D) + 4 * HQ
    swa_b = s * (4 * HQ * D + 4 * HKV * D) + 4 * HQ
    # fused: q_pre, k_pre, gate, v, q_rope, k_rope read once in the model dtype, o written once, lse (fp32) for bwd
    fused_f = s * (3 * HQ * D + 4 * HKV * D) + 4 * HQ
    fused_b = s * (5 * HQ * D + 8 * HKV * D) + 4 * HQ
    f = {"gla": gla_f, "swa": swa_f, "liger": gla_f + swa_f, "sdpa": swa_f, "liger_fused": fused_f,
         "liger_unfused": fused_f}[op]
    b = {"gla": gla_b, "swa": swa_b, "liger": gla_b + swa_b, "sdpa": swa_b, "liger_fused": fused_b,
         "liger_unfused": fused_b}[op]
    return f if mode == "fwd" else f + b


def copy_bandwidth():
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def liger_like_inputs(B, T, D, dtype):
    """q, k = softmax feature maps, v, g = logsigmoid(x)/16 (Liger's gate), and RoPE'd-like qs, ks, on CUDA."""
    HQ, HKV = HEADS[D]
    dev = "cuda"
    q = torch.randn(B, HQ, T, D, device=dev).softmax(-1).to(dtype)
    k = torch.randn(B, HKV, T, D, device=dev).softmax(-1).to(dtype)
    v = torch.randn(B, HKV, T, D, device=dev, dtype=dtype)
    g = (F.logsigmoid(torch.randn(B, HKV, T, D, device=dev)) / 16).to(dtype)
    qs = torch.randn(B, HQ, T, D, device=dev, dtype=dtype)
    ks = torch.randn(B, HKV, T, D, device=dev, dtype=dtype)
    return q, k, v, g, qs, ks


def make_ops(B, T, D, dtype=torch.bfloat16):
    HQ, HKV = HEADS[D]
    dev = "cuda"
    q, k, v, g, qs, ks = liger_like_inputs(B, T, D, dtype)
    pos = torch.arange(T, device=dev).expand(B, T).contiguous()
    scale = D ** -0.5
    do32 = torch.randn(B, HQ, T, D, device=dev)
    do = do32.to(dtype)

    def gla_fwd():
        return chunk.chunk_gla_fwd(q, k, v, g, None)

    def gla_fb():
        chunk.chunk_gla_fwd(q, k, v, g, None)
        return chunk.chunk_gla_bwd(q, k, v, g, None, do32, None)

    def swa_fwd():
        return swa.swa_fwd(qs, ks, v, pos, pos, scale, WINDOW, 0)

    def swa_fb():
        o, lse = swa.swa_fwd(qs, ks, v, pos, pos, scale, WINDOW, 0)
        return swa.swa_bwd(qs, ks, v, pos, pos, o, lse, do, scale, WINDOW, 0)

    # raw projections for the whole-layer ops (q_rope, k_rope = qs, ks)
    q_pre = torch.randn(B, HQ, T, D, device=dev, dtype=dtype)
    k_pre = torch.randn(B, HKV, T, D, device=dev, dtype=dtype)
    gate = torch.randn(B, HKV, T, D, device=dev, dtype=dtype)
    cfg = LigerConfig(window=WINDOW)

    def fused_fwd():
        return fused.liger_fwd(q_pre, k_pre, v, gate, qs, ks, None, None, scale, WINDOW, cfg.mix,
                               cfg.gate_normalizer)

    def fused_fb():
        o, _, lse = fused.liger_fwd(q_pre, k_pre, v, gate, qs, ks, None, None, scale, WINDOW, cfg.mix,
                                    cfg.gate_normalizer)
        return fused.liger_bwd(q_pre, k_pre, v, gate, qs, ks, None, None, lse, do, None, scale, WINDOW, cfg.mix,
                               cfg.gate_normalizer)

    leaves = [x.clone().requires_grad_() for x in (q_pre, k_pre, v, gate, qs, ks)]

    def unfused_fwd():
        with torch.no_grad():
            return liger.liger_attention(q_pre, k_pre, v, gate, qs, ks, scale=scale, cfg=cfg)

    def unfused_fb():
        liger.liger_attention(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5], scale=scale,
                              cfg=cfg).backward(do)

    kr = ks.repeat_interleave(HQ // HKV, 1).requires_grad_()
    vr = v.repeat_interleave(HQ // HKV, 1).requires_grad_()
    qr = qs.clone().requires_grad_()

    def sdpa_fwd():
        with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)

    def sdpa_fb():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
        o.backward(do)

    return {
        ("gla", "fwd"): gla_fwd, ("gla", "fwd+bwd"): gla_fb,
        ("swa", "fwd"): swa_fwd, ("swa", "fwd+bwd"): swa_fb,
        ("liger", "fwd"): lambda: (gla_fwd(), swa_fwd()), ("liger", "fwd+bwd"): lambda: (gla_fb(), swa_fb()),
        ("sdpa", "fwd"): sdpa_fwd, ("sdpa", "fwd+bwd"): sdpa_fb,
        ("liger_fused", "fwd"): fused_fwd, ("liger_fused", "fwd+bwd"): fused_fb,
        ("liger_unfused", "fwd"): unfused_fwd, ("liger_unfused", "fwd+bwd"): unfused_fb,
    }, [qr, kr, vr] + leaves


def import_fla():
    """``(chunk_gla, parallel_attn, version)`` from fla, or ``None`` and a one-line reason."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fla
            from fla.ops.attn import parallel_attn
            from fla.ops.gla import chunk_gla
        return (chunk_gla, parallel_attn, fla.__version__), None
    except Exception as e:  # not installed, or an incompatible torch/triton
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


def make_fla_ops(fla, B, T, D, dtype=torch.bfloat16):
    """fla's chunk_gla and parallel_attn on inputs drawn like make_ops's (Liger-like q, k, g), seq-first; k, v, g
    repeated to the HQ query heads for chunk_gla (no GQA there), all outside the timed region."""
    chunk_gla, parallel_attn, _ = fla
    HQ, HKV = HEADS[D]
    G, dev = HQ // HKV, "cuda"
    q, k, v, g, qs, ks = liger_like_inputs(B, T, D, dtype)

    def seq_first(x, rep=False):
        return (x.repeat_interleave(G, 1) if rep else x).transpose(1, 2).contiguous()

    gla_in = [seq_first(q), seq_first(k, True), seq_first(v, True), seq_first(g, True)]
    swa_in = [seq_first(qs), seq_first(ks), seq_first(v)]
    leaves = [x.clone().requires_grad_() for x in gla_in + swa_in]
    do = torch.randn(B, T, HQ, D, device=dev, dtype=dtype)
    scale = D ** -0.5

    def gla_fwd():
        with torch.no_grad():
            return chunk_gla(*gla_in, scale=1.0, output_final_state=True)

    def gla_fb():
        o, _ = chunk_gla(*leaves[:4], scale=1.0, output_final_state=True)
        o.backward(do)

    def swa_fwd():
        with torch.no_grad():
            return parallel_attn(*swa_in, scale=scale, window_size=WINDOW + 1)

    def swa_fb():
        parallel_attn(*leaves[4:], scale=scale, window_size=WINDOW + 1).backward(do)

    return {("gla", "fwd"): gla_fwd, ("gla", "fwd+bwd"): gla_fb,
            ("swa", "fwd"): swa_fwd, ("swa", "fwd+bwd"): swa_fb}, leaves


def fla_row_ms(op, fla_ms):
    """The fla time matching a row of ``op`` (see the module docstring), from ``{"gla": ms, "swa": ms}``."""
    gla, swa_ = fla_ms.get("gla"), fla_ms.get("swa")
    if op == "gla":
        return gla
    if op == "swa":
        return swa_
    if op in ("liger", "liger_fused", "liger_unfused") and gla is not None and swa_ is not None:
        return gla + swa_
    return None


def profile(B, T, D):
    """Per-kernel CUDA time of one GLA, one SWA and one fused Liger forward+backward (after a warm-up call)."""
    ops, _ = make_ops(B, T, D)
    for key in (("gla", "fwd+bwd"), ("swa", "fwd+bwd"), ("liger_fused", "fwd+bwd")):
        ops[key]()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                ops[key]()
            torch.cuda.synchronize()
        print(f"== {key[0]} {key[1]} B={B} T={T} D={D} HQ,HKV={HEADS[D]} (3 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def launch_configs() -> str:
    """Where the kernels' launch configs come from in this run: the autotuner, a tuned table, or the defaults."""
    from ligerfx.kernels import utils
    if os.environ.get("LIGERFX_AUTOTUNE", "0") == "1":
        return "LIGERFX_AUTOTUNE=1"
    table = utils.tuned_table(torch.device("cuda"))
    if table is None:
        return "defaults"
    return f"tuned table ({sum(len(v) for v in table.values())} launch keys; LIGERFX_TUNED=0 for the defaults)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--max-T-256", type=int, default=32768, help="longest T timed at D=256")
    ap.add_argument("--max-T-64", type=int, default=32768, help="longest T timed at D=64")
    ap.add_argument("--compile-only", action="store_true", help="run every kernel once at T=256 (warms the cache)")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times (torch.profiler) per --D/--T")
    ap.add_argument("--ops", nargs="+", default=["gla", "swa", "liger", "liger_fused", "liger_unfused", "sdpa"],
                    help="ops to time (sdpa is always timed: the ratios refer to it)")
    ap.add_argument("--no-fla", action="store_true", help="do not time fla even when it is installed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print("command:", " ".join(["python"] + sys.argv), flush=True)
    if args.profile:
        for D in args.D:
            for T in args.T:
                profile(max(1, 16384 // T), T, D)
        return
    if args.compile_only:
        for D in args.D:
            for fn in make_ops(2, 256, D)[0].values():
                fn()
        torch.cuda.synchronize()
        print("compiled")
        return

    fla, why = (None, "--no-fla") if args.no_fla else import_fla()
    fla_version = fla[2] if fla else None
    card_name = torch.cuda.get_device_name()
    card = next((c for c in ("h100", "h200", "a100", "b200", "gb200") if c in card_name.lower()), "gpu")
    bw = copy_bandwidth()
    launch = launch_configs()
    print(f"card: {card_name}; copy bandwidth {bw / 1e12:.2f} TB/s; triton {triton.__version__}; torch "
          f"{torch.__version__}; launch configs: {launch}", flush=True)
    if fla:
        print(f"fla {fla_version}: chunk_gla (k, v, g repeated to HQ heads) and parallel_attn (window {WINDOW + 1}) "
              "timed on the same inputs", flush=True)
    else:
        print(f"fla not timed ({why}): fla_ms = null. Install: pip install --no-deps .carry/fla/*.whl", flush=True)
    rows = []
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{card}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save():  # after every shape, so a run cut short by a time limit keeps what it measured
        with open(out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(out + ".tmp", out)

    for D in args.D:
        HQ, HKV = HEADS[D]
        for T in args.T:
            if (D == 256 and T > args.max_T_256) or (D == 64 and T > args.max_T_64):
                continue
            B = max(1, 16384 // T)
            try:
                ops, grads = make_ops(B, T, D)
                for (op, _), fn in ops.items():  # compile / autotune outside the timed region
                    if op in args.ops or op == "sdpa":
                        fn()
                torch.cuda.synchronize()
            except Exception as e:  # keep the other shapes
                print(f"D={D} T={T}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            fla_ops, fla_grads = {}, []
            if fla:
                fla_ops, fla_grads = make_fla_ops(fla, B, T, D)
                for key, fn in list(fla_ops.items()):  # autotune outside the timed region; drop what fails
                    try:
                        fn()
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"D={D} T={T}: fla {key[0]} {key[1]} FAILED {type(e).__name__}: {e}".splitlines()[0],
                              flush=True)
                        del fla_ops[key]
            for mode in ("fwd", "fwd+bwd"):
                t0 = time.time()
                ms = {op: triton.testing.do_bench(ops[(op, mode)], warmup=25, rep=100, return_mode="median",
                                                  grad_to_none=grads if op in ("sdpa", "liger_unfused") else None)
                      for op in dict.fromkeys([o for o in args.ops if o != "sdpa"] + ["sdpa"])}
                fla_ms = {op: triton.testing.do_bench(fla_ops[(op, m)], warmup=25, rep=100, return_mode="median",
                                                      grad_to_none=fla_grads)
                          for (op, m) in fla_ops if m == mode}
                for op, t in ms.items():
                    floor = B * T * floor_bytes(op, mode, HQ, HKV, D) / bw * 1e3
                    f = fla_row_ms(op, fla_ms)
                    rows.append(dict(op=op, mode=mode, T=T, B=B, H=HQ, HKV=HKV, D=D, ms=round(t, 4),
                                     fla_ms=None if f is None else round(f, 4),
                                     fla_gla_ms=None if "gla" not in fla_ms else round(fla_ms["gla"], 4),
                                     fla_swa_ms=None if "swa" not in fla_ms else round(fla_ms["swa"], 4),
                                     ratio_to_fla=None if f is None else round(t / f, 3),
                                     sdpa_ms=round(ms["sdpa"], 4), hbm_floor_ms=round(floor, 4),
                                     pct_of_floor=round(100 * floor / t, 1), ratio_to_sdpa=round(t / ms["sdpa"], 3),
                                     card=card_name, fla_version=fla_version, launch=launch))
                print(f"D={D} T={T} B={B} {mode}: " + "  ".join(f"{op} {t:.3f}" for op, t in ms.items())
                      + "".join(f"  fla_{op} {t:.3f}" for op, t in fla_ms.items())
                      + f"  ({time.time() - t0:.1f}s)", flush=True)
            del ops, fla_ops, fla_grads
            torch.cuda.empty_cache()
            save()
    save()
    def opt(x, fmt):
        return format(x, fmt) if x is not None else format("-", fmt[:-3] if "." in fmt else fmt)

    print(f"\n{'op':13} {'mode':8} {'D':>4} {'T':>6} {'B':>2} {'ms':>9} {'sdpa':>9} {'x sdpa':>7} {'fla':>9} "
          f"{'x fla':>6} {'floor':>8} {'%floor':>6}")
    for r in rows:
        print(f"{r['op']:13} {r['mode']:8} {r['D']:>4} {r['T']:>6} {r['B']:>2} {r['ms']:>9.3f} {r['sdpa_ms']:>9.3f} "
              f"{r['ratio_to_sdpa']:>7.2f} {opt(r['fla_ms'], '>9.3f')} {opt(r['ratio_to_fla'], '>6.2f')} "
              f"{r['hbm_floor_ms']:>8.3f} {r['pct_of_floor']:>6.1f}")
    if not fla:
        print(f"fla not timed ({why}): fla_ms = null")
    print("wrote", out)


if __name__ == "__main__":
    main()
