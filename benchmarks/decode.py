"""Whole-model decode benchmark: the softmax teacher (HF SDPA, DynamicCache) against ligerfx (same weights).

    TRITON_INTERPRET=0 python benchmarks/decode.py [--models llama-1b,gemma-3-270m] [--contexts 1K,4K,16K,64K,128K]
        [--batch 1] [--steps 32] [--warmup 4] [--compile] [--out-dir benchmarks/results]
    python benchmarks/decode.py --device cpu --contexts 256,512 --steps 4 --tiny    # CPU smoke run, seconds
    python benchmarks/decode.py ... --variant complementary                           # the other Liger variants
    python benchmarks/decode.py --plot-only benchmarks/results/decode-h100.json      # table + PNG from a JSON

Models: ``llama-1b`` is a random-init bf16 model with Llama-3.2-1B shapes (hidden 2048, 16 layers, 32 query / 8 KV
heads of 64, MLP 8192, vocab 128256, llama3 RoPE theta 500000, tied embeddings; built from ``LlamaConfig``, no hub);
``llama-tiny`` the same at 2 layers, hidden 128; any other name goes to ``ligerfx.models.load_model`` (e.g.
``gemma-3-270m``). Each model runs every context as the teacher first, then ``ligerfx.transform(model,
passes=["linearize"])`` in place (identical weights) and every context again.

One measurement: prefill ``context`` random tokens (last-position logits only; one call, and when that runs out of
memory, chunks of 16K then 4K tokens through the cache; ``--prefill-chunk`` forces chunks), ``--warmup`` greedy steps,
then ``--steps`` timed steps, each ``model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)`` plus the
argmax, ended by ``torch.cuda.synchronize()``. Reported per step: median and p90 ms, tokens/s = batch * 1000 / median.
Memory (CUDA): ``peak_mem_bytes`` = ``max_memory_allocated`` over warmup + timed decode, reset after the prefill
(absolute: weights + cache + transients); ``peak_mem_total_bytes`` the same over prefill and decode;
``decode_extra_bytes`` = decode peak - allocated when decode starts. ``cache_bytes`` = ``ligerfx.cache_nbytes(cache)``
after the prefill. An out-of-memory error gives ``status: "OOM"``; any other error ``"error: ..."``; the run goes on.

``--compile`` wraps the decode step in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). The teacher then uses
HF's ``StaticCache`` (its compile path) sized to context + warmup + steps; ligerfx keeps its cache and is compiled
only if ``cache.is_compileable`` after the prefill (otherwise ``status: "skipped: ..."``).

Rows go to ``<out-dir>/decode-<card>[-b<batch>][-compile][-tiny].json`` (rewritten after every measurement) and the
figure to the same name with ``.png``: ms/token and peak memory against context, teacher dashed, ligerfx solid.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ligerfx  # noqa: E402
from ligerfx.liger import FUSED_DECODE  # noqa: E402

LLAMA = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                     rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
LLAMA["llama-tiny"] = {**LLAMA["llama-1b"], "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "vocab_size": 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFILL_FALLBACK = (16384, 4096)  # chunk sizes tried, in order, when a one-call prefill runs out of memory
MiB = 2 ** 20


def parse_context(s: str) -> int:
    s = s.strip().upper()
    return int(s[:-1]) * 1024 if s.endswith("K") else int(s)


def ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def card_slug(card: str) -> str:
    low = card.lower()
    known = next((c for c in ("gb200", "b200", "h200", "h100", "a100", "l40s", "a10g") if c in low), None)
    return known or "".join(ch if ch.isalnum() else "-" for ch in low).strip("-") or "gpu"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(name: str, dtype: torch.dtype, device: torch.device):
    if name in LLAMA:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA[name]), dtype=dtype,
                                                     attn_implementation="sdpa")
        return model.eval()
    from ligerfx.models import load_model

    model, _ = load_model(name, dtype=dtype, device=device, attn_implementation="sdpa")
    return model.eval()


def new_cache(model, impl: str, max_len: int, compile: bool):
    from transformers import DynamicCache, StaticCache

    if compile and impl == "teacher":
        return StaticCache(config=model.config, max_cache_len=max_len), "StaticCache"
    return DynamicCache(config=model.config), "DynamicCache"


def forward(model, kw, ids, pos, cache):
    return model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}).logits


def prefill(model, kw, cache, ids, chunk):
    B, T = ids.shape
    with torch.no_grad():
        for s in range(0, T, chunk):
            x = ids[:, s:s + chunk]
            pos = torch.arange(s, s + x.shape[1], device=ids.device).expand(B, -1)
            logits = forward(model, kw, x, pos, cache)
    return logits[:, -1].argmax(-1, keepdim=True)


def measure(model, impl: str, ctx: int, args, device, row: dict) -> dict:
    B, compiled = args.batch, args.compile
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (B, ctx), generator=torch.Generator().manual_seed(ctx)).to(device)
    cuda = device.type == "cuda"
    plan = [args.prefill_chunk] if args.prefill_chunk else [ctx] + [c for c in PREFILL_FALLBACK if c < ctx]
    for i, chunk in enumerate(plan):
        cache = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            cache, row["cache_kind"] = new_cache(model, impl, ctx + args.warmup + args.steps, compiled)
            sync(device)
            t0 = time.perf_counter()
            tok = prefill(model, kw, cache, ids, chunk)
            sync(device)
            row["prefill_s"] = round(time.perf_counter() - t0, 4)
            row["prefill_chunk"] = chunk
            break
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or i == len(plan) - 1:
                row["phase"] = "prefill"
                raise
        cache = None
        free(device)
    del ids
    row["cache_bytes"] = ligerfx.cache_nbytes(cache)
    step = lambda tok, pos: forward(model, kw, tok, pos, cache)  # noqa: E731
    if compiled:
        if not cache.is_compileable:
            kinds = sorted({type(layer).__name__ for layer in cache.layers if not layer.is_compileable})
            row["status"] = f"skipped: cache not compileable ({', '.join(kinds)}.is_compileable is False)"
            return row
        torch._dynamo.reset()
        step = torch.compile(step, mode="reduce-overhead")
    pos = torch.full((B, 1), ctx, device=device, dtype=torch.long)
    free(device)
    if cuda:
        row["peak_mem_total_bytes"] = torch.cuda.max_memory_allocated()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    row["phase"] = "decode"
    times = []
    graphs = None
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            if i == args.warmup and compiled:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            t0 = time.perf_counter()
            tok = step(tok, pos)[:, -1].argmax(-1, keepdim=True)
            pos = pos + 1
            sync(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    del row["phase"]
    times.sort()
    med = statistics.median(times)
    row.update(ms_per_token_median=round(med, 4), ms_p90=round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
               tokens_per_s=round(B * 1e3 / med, 2), status="ok")
    if cuda:
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        row["decode_extra_bytes"] = row["peak_mem_bytes"] - start
        row["peak_mem_total_bytes"] = max(row["peak_mem_total_bytes"], row["peak_mem_bytes"])
    if compiled and torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        row["status"] = "ok (recompiled during the timed steps)"
    return row


def run_one(model, name, impl, ctx, args, device, meta) -> dict:
    row = dict(model=name, impl=impl, context=ctx, batch=args.batch, ms_per_token_median=None, ms_p90=None,
               tokens_per_s=None, peak_mem_bytes=None, peak_mem_total_bytes=None, decode_extra_bytes=None,
               cache_bytes=None, status=None, **meta)
    t0 = time.time()
    try:
        measure(model, impl, ctx, args, device, row)
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            row["status"] = "OOM"
            row["error"] = f"OOM in {row.pop('phase', '?')}"
        else:
            row.pop("phase", None)
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            traceback.print_exc(file=sys.stderr)
    if args.compile:
        torch._dynamo.reset()  # drops the compiled step, its cache reference and its CUDA graph pool
    free(device)
    progress(row, time.time() - t0)
    return row


def progress(r, secs):
    if r["status"].startswith("ok"):
        mem = f", peak {r['peak_mem_bytes'] / MiB:.0f} MiB" if r["peak_mem_bytes"] is not None else ""
        msg = (f"prefill {r['prefill_s']:.2f}s (chunk {r['prefill_chunk']}), {r['ms_per_token_median']:.2f} ms/tok "
               f"(p90 {r['ms_p90']:.2f}){mem}, cache {r['cache_bytes'] / MiB:.2f} MiB")
    else:
        msg = r["status"] + (f" ({r['error']})" if r.get("error") else "")
    print(f"[decode] {r['model']} {r['impl']:7} ctx={ctx_label(r['context'])} B={r['batch']}: {msg}  [{secs:.1f}s]",
          file=sys.stderr, flush=True)


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt_ms(r):
    if r is None:
        return "-"
    if r["status"].startswith("ok"):
        return f"{r['ms_per_token_median']:.2f}"
    return "OOM" if r["status"] == "OOM" else r["status"].split(":")[0]


def fmt_mib(r, key):
    if r is None or r.get(key) is None:
        return "-"
    v = r[key] / MiB
    return f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def print_tables(rows):
    if not rows:
        return
    r0 = rows[0]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        by = {(r["impl"], r["context"]): r for r in mine}
        print(f"\n## {name} | {r0['card']} | batch {r0['batch']} | {r0['dtype']} | torch {r0['torch']} | transformers "
              f"{r0['transformers']}{' | torch.compile reduce-overhead' if r0.get('compile') else ''}")
        head = ["context", "teacher ms/tok", "ligerfx ms/tok", "speedup", "teacher peak MiB", "ligerfx peak MiB",
                "teacher cache MiB", "ligerfx cache MiB"]
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(" ---: " for _ in head) + "|")
        for ctx in sorted({r["context"] for r in mine}):
            t, lg = by.get(("teacher", ctx)), by.get(("ligerfx", ctx))
            sp = "-"
            if t and lg and t["tokens_per_s"] and lg["tokens_per_s"]:
                sp = f"{lg['tokens_per_s'] / t['tokens_per_s']:.2f}x"
            cells = [ctx_label(ctx), fmt_ms(t), fmt_ms(lg), sp, fmt_mib(t, "peak_mem_bytes"),
                     fmt_mib(lg, "peak_mem_bytes"), fmt_mib(t, "cache_bytes"), fmt_mib(lg, "cache_bytes")]
            print("| " + " | ".join(cells) + " |")
        for r in mine:
            if not r["status"].startswith("ok") and r["status"] != "OOM":
                print(f"  {r['impl']} {ctx_label(r['context'])}: {r['status']}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_peak = any(r.get("peak_mem_bytes") is not None for r in rows)
    mem_key = "peak_mem_bytes" if has_peak else "cache_bytes"
    unit, unit_name = (2 ** 30, "GiB") if max((r.get(mem_key) or 0) for r in rows) >= 2 ** 30 else (MiB, "MiB")
    contexts = sorted({r["context"] for r in rows})
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        for impl, style, marker in (("teacher", "--", "o"), ("ligerfx", "-", "s")):
            mine = sorted((r for r in rows if r["model"] == name and r["impl"] == impl), key=lambda r: r["context"])
            ok = [r for r in mine if r["status"].startswith("ok")]
            kw = dict(linestyle=style, marker=marker, color=colors[i % len(colors)], label=f"{name} {impl}")
            ax_t.plot([r["context"] for r in ok], [r["ms_per_token_median"] for r in ok], **kw)
            ax_m.plot([r["context"] for r in ok], [r[mem_key] / unit for r in ok], **kw)
            for r in mine:
                if r["status"] == "OOM":
                    for ax in (ax_t, ax_m):
                        ax.annotate("OOM", (r["context"], 0.97), xycoords=("data", "axes fraction"), ha="center",
                                    va="top", color=kw["color"], fontsize=8)
    for ax, ylabel in ((ax_t, "ms / token (median)"),
                       (ax_m, f"peak GPU memory during decode ({unit_name})" if has_peak else f"cache ({unit_name}; no CUDA peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [ctx_label(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"decode: teacher (dashed) vs ligerfx (solid) | {r0['card']} | batch {r0['batch']} | {r0['dtype']}"
                 f"{' | compiled' if r0.get('compile') else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None,
                    help="comma list: llama-1b, llama-tiny or a load_model spec (default llama-1b,gemma-3-270m; "
                         "--tiny: llama-tiny)")
    ap.add_argument("--contexts", default="1K,4K,16K,64K,128K", help="comma list; 1K = 1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="default bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="prefill in chunks of N tokens (0: one call, "
                    f"falling back to {'/'.join(map(str, PREFILL_FALLBACK))} on OOM)")
    ap.add_argument("--impls", default="teacher,ligerfx")
    ap.add_argument("--compile", action="store_true", help='torch.compile(mode="reduce-overhead") on the decode step')
    ap.add_argument("--tiny", action="store_true", help="llama-tiny (2 layers, hidden 128) instead of llama-1b")
    ap.add_argument("--variant", default="gla", choices=("gla", "swa_sinks", "complementary"),
                    help="LigerConfig.variant of the ligerfx rows (default gla; others add -<variant> to the file name)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--plot-only", metavar="JSON", help="print the tables and write the PNG of an existing JSON")
    args = ap.parse_args()
    print("command:", " ".join(["python"] + sys.argv), flush=True)

    if args.plot_only:
        rows = json.loads(Path(args.plot_only).read_text())
        print_tables(rows)
        png = Path(args.plot_only).with_suffix(".png")
        plot(rows, png)
        print("wrote", png)
        return

    device = torch.device(args.device)
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("warning: TRITON_INTERPRET is set; ligerfx kernels will run in the interpreter", file=sys.stderr)
    else:
        card = f"cpu ({platform.machine()})"
    slug = card_slug(card) if device.type == "cuda" else "cpu"
    models = (args.models or ("llama-tiny" if args.tiny else "llama-1b,gemma-3-270m")).split(",")
    if args.tiny:
        models = ["llama-tiny" if m == "llama-1b" else m for m in models]
    contexts = [parse_context(c) for c in args.contexts.split(",")]
    impls = [i for i in ("teacher", "ligerfx") if i in args.impls.split(",")]
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    suffix = (f"-b{args.batch}" if args.batch != 1 else "") + ("-compile" if args.compile else "") + \
             ("-tiny" if "llama-tiny" in models else "") + (f"-{args.variant}" if args.variant != "gla" else "")
    out = Path(args.out_dir) / f"decode-{slug}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(card=card, device=device.type, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                transformers=transformers.__version__, compile=args.compile, steps=args.steps, warmup=args.warmup,
                commit=git_rev(), fused_decode=FUSED_DECODE, variant=args.variant)
    print(f"card: {card}; torch {torch.__version__}; transformers {transformers.__version__}; batch {args.batch}; "
          f"{meta['dtype']}; steps {args.steps} (+{args.warmup} warmup); contexts "
          f"{', '.join(map(ctx_label, contexts))}", flush=True)

    rows = []
    for name in models:
        t0 = time.time()
        try:
            model = load(name, dtype, device)
        except Exception as e:  # noqa: BLE001
            status = f"error: load: {type(e).__name__}: {e}"[:500]
            print(f"[decode] {name}: {status}", file=sys.stderr, flush=True)
            rows += [dict(model=name, impl=i, context=c, batch=args.batch, ms_per_token_median=None, ms_p90=None,
                          tokens_per_s=None, peak_mem_bytes=None, cache_bytes=None, status=status, **meta)
                     for i in impls for c in contexts]
            continue
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        mmeta = dict(meta, params=sum(p.numel() for p in model.parameters()), weights_bytes=weights,
                     max_position_embeddings=getattr(model.config.get_text_config(), "max_position_embeddings", None))
        print(f"[decode] {name}: loaded in {time.time() - t0:.1f}s, {mmeta['params'] / 1e6:.1f}M params",
              file=sys.stderr, flush=True)
        for impl in impls:
            if impl == "ligerfx":
                t0 = time.time()
                try:
                    ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(variant=args.variant))
                except Exception as e:  # noqa: BLE001
                    status = f"error: transform: {type(e).__name__}: {e}"[:500]
                    traceback.print_exc(file=sys.stderr)
                    rows += [dict(model=name, impl=impl, context=c, batch=args.batch, ms_per_token_median=None,
                                  ms_p90=None, tokens_per_s=None, peak_mem_bytes=None, cache_bytes=None,
                                  status=status, **mmeta) for c in contexts]
                    continue
                print(f"[decode] {name}: transformed in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
            for ctx in contexts:
                rows.append(run_one(model, name, impl, ctx, args, device, mmeta))
                out.write_text(json.dumps(rows, indent=1))
        del model
        free(device)
    out.write_text(json.dumps(rows, indent=1))
    print_tables(rows)
    png = out.with_suffix(".png")
    plot(rows, png)
    print(f"\nwrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
