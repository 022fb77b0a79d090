"""What one decode step launches, per layer: the structural cost of decoding, measurable without a GPU.

    python benchmarks/decode_ops.py                        # llama-tiny shapes (2 layers), CPU, fp32
    python benchmarks/decode_ops.py --layers 4 --no-compile --out /tmp/ops.json
    python benchmarks/decode_ops.py --liger-variant complementary --out benchmarks/results/decode-ops-cpu-complementary.json

At batch 1 a compiled decode step is bound by the number of kernels it launches, not by FLOPs or bytes (docs/
BENCHMARKS.md: the compiled ligerfx step of a 1B Llama costs ~90 us per layer more than the teacher's at 1K context
on an H200). This script counts, for one decode step after a prefill of ``--context`` tokens:

* ``eager_ops``: top-level dispatcher calls (``aten::*`` and ``ligerfx::*`` events without a parent in
  ``torch.profiler``) of the eager step; each is at least one kernel launch on a GPU;
* ``eager_host_syncs``: device-to-host reads in the eager step (``item``/``is_nonzero``/``nonzero``): each stalls the
  launch queue on a GPU;
* ``compiled_kernels``: kernels Inductor generates for the decode graph (``torch._inductor.metrics.
  generated_kernel_count``, CPU backend; the CUDA backend fuses the same way, so the count is a proxy) plus the
  ``ligerfx::`` custom-op calls that run in it (``compiled_custom_ops``, counted by the profiler at run time);

for the teacher (HF SDPA attention, ``DynamicCache``), ligerfx's branch-by-branch decode path
(``LIGERFX_FUSED_DECODE=0``) and, when it exists, its fused decode op (``LIGERFX_FUSED_DECODE=1``). Reported per
variant: totals and ``(variant - teacher) / layers``, the extra launches per linearized layer. The counts do not
depend on the hidden size, so tiny shapes give the numbers of a full-size model of the same architecture.
Rows go to ``--out`` (default ``benchmarks/results/decode-ops-cpu.json``); a table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("teacher", "ligerfx", "ligerfx_fused")


def build(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, intermediate_size=256, vocab_size=1024, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


SYNCS = ("aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def top_level_ops(fn) -> tuple[int, int, int]:
    """(top-level aten/ligerfx calls, ligerfx calls at any depth, device->host reads) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None and e.name.startswith(("aten::", "ligerfx::"))]
    custom = [e for e in events if e.name.startswith("ligerfx::")]
    return len(top), len(custom), sum(e.name in SYNCS for e in events)


def measure(variant: str, layers: int, context: int, compile_: bool, liger_variant: str = "gla") -> dict:
    """Run in a fresh process per variant (the env switch and Inductor's counters are process-wide).
    ``liger_variant``: the ``LigerConfig.variant`` of the linearized rows."""
    from transformers import DynamicCache

    import ligerfx

    model = build(layers)
    if variant != "teacher":
        ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(variant=liger_variant))
    ids = torch.randint(0, 1024, (1, context))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def step():
        nonlocal tok
        with torch.no_grad():
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)

    step()  # one warm step (lazy buffers)
    row = dict(variant=variant, layers=layers, context=context, liger_variant=liger_variant)
    row["eager_ops"], row["eager_custom_ops"], row["eager_host_syncs"] = top_level_ops(step)
    if compile_:
        from torch._inductor import metrics

        compiled = torch.compile(model, backend="inductor", dynamic=False)
        metrics.reset()

        def cstep():
            nonlocal tok
            with torch.no_grad():
                out = compiled(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)

        cstep()
        row["compiled_kernels"] = metrics.generated_kernel_count
        cstep()
        _, row["compiled_custom_ops"], _ = top_level_ops(cstep)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode-ops-cpu.json"))
    ap.add_argument("--liger-variant", default="gla", choices=("gla", "swa_sinks", "complementary"),
                    help="LigerConfig.variant of the linearized rows")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:  # child process: one variant, one JSON line on stdout
        print(json.dumps(measure(args._one, args.layers, args.context, not args.no_compile, args.liger_variant)))
        return
    import ligerfx.liger as liger_mod

    has_fused = hasattr(liger_mod, "FUSED_DECODE")
    rows = []
    for v in args.variants.split(","):
        if v == "ligerfx_fused" and not has_fused:
            print("ligerfx_fused: this build has no fused decode op (LIGERFX_FUSED_DECODE); skipped")
            continue
        env = dict(os.environ, LIGERFX_FUSED_DECODE="1" if v == "ligerfx_fused" else "0", TRITON_INTERPRET="0")
        cmd = [sys.executable, __file__, "--_one", v.replace("_fused", ""), "--layers", str(args.layers),
               "--context", str(args.context), "--liger-variant", args.liger_variant] + (
                   ["--no-compile"] if args.no_compile else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{v}: failed\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["variant"] = v
        rows.append(row)
        print(f"[decode-ops] {v}: {row}", flush=True)
    base = next((r for r in rows if r["variant"] == "teacher"), None)
    for r in rows:
        for k in ("eager_ops", "compiled_kernels"):
            if base and k in r and k in base:
                r[f"{k}_extra_per_layer"] = round((r[k] - base[k]) / r["layers"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, device="cpu", rows=rows), indent=1) + "\n")
    print(f"\n| variant | eager ops / step | extra per layer | host syncs | compiled kernels | extra per layer | "
          f"ligerfx ops in compiled step |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['eager_ops']} | {r.get('eager_ops_extra_per_layer', '-')} | "
              f"{r['eager_host_syncs']} | "
              f"{r.get('compiled_kernels', '-')} | {r.get('compiled_kernels_extra_per_layer', '-')} | "
              f"{r.get('compiled_custom_ops', '-')} |")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
