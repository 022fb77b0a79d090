"""Training-step benchmark: one LoRA optimizer step of a linearized model, eager against torch.compile.

    TRITON_INTERPRET=0 python benchmarks/train_step.py [--arch gemma-270m|llama-1b] [--batch 8] [--seq 1024]
        [--warmup 3] [--steps 10] [--modes eager,ligerfx,inductor] [--scope model|step] [--out-dir benchmarks/results]
    python benchmarks/train_step.py --device cpu --tiny        # CPU smoke run (tests/test_bench_train_step.py)

Model: random weights, no download. ``gemma-270m`` = Gemma-3-270M's shapes (``GEMMA_270M`` below: hidden 640,
18 layers, 4 query / 1 KV heads of 256, MLP 2048, vocab 262144, 5 sliding : 1 full layers, tied embeddings);
``llama-1b`` = Llama-3.2-1B's (hidden 2048, 16 layers, 32 / 8 heads of 64, MLP 8192, vocab 128256, llama3 RoPE).
``--tiny`` shrinks either to 2 layers, hidden 64, vocab 512 (B 2 x T 64, 1 warm-up and 2 timed steps unless given).
Weights fp32, ``attn_implementation="sdpa"``, then ``ligerfx.transform(model, passes=["linearize", "lora"])``: the
step trains the LoRA parameters only (AdamW, lr 1e-4; fused on CUDA). Each mode rebuilds the model from the same seed,
so every mode starts from identical weights and data.

Modes: ``eager`` (the transformed model as is), ``ligerfx`` = ``torch.compile(model, backend="ligerfx")`` (on a
transformed model the backend rewrites nothing and Inductor lowers the graph around the ``ligerfx::`` custom ops),
``inductor`` = ``torch.compile(model)``. ``--scope model`` (default) compiles the model's forward (its backward
through AOTAutograd) and computes the loss with ``ligerfx.training.trainer.micro_step_loss`` (what ``ligerfx train``
runs: bf16 autocast forward, fp32 CE summed over every next-token target, here divided by the target count);
``--scope step`` compiles forward + the same mean CE as one function. The optimizer step stays eager.

One step = loss, ``backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, ended by a device sync.
``--warmup`` untimed steps first (the first one compiles: ``compile_s`` = its wall time minus the median step),
then ``--steps`` timed steps. Reported: median and p90 ms per step, tokens/s = B * T / median, ``speedup`` =
eager median / median, peak memory (``max_memory_allocated`` over the timed steps; null on CPU), Dynamo's graph count
(``counters["stats"]["unique_graphs"]``) and graph breaks (``counters["graph_break"]``, reasons kept), the losses of
every step, and ``loss_matches_eager``: first-step loss within 1e-2 relative of eager's (same weights, same batch).

Rows go to ``<out-dir>/train-step-<card>[-<arch>][-tiny].json`` (gemma-270m, the default, has no arch suffix).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ligerfx  # noqa: E402
from ligerfx.training.trainer import micro_step_loss  # noqa: E402

# Gemma-3-270M's text config (transformers 5.24 ``Gemma3TextConfig`` of google/gemma-3-270m).
GEMMA_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=512,
    attention_bias=False, attention_dropout=0.0, final_logit_softcapping=None, attn_logit_softcapping=None,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
)
# Llama-3.2-1B (as benchmarks/decode.py).
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
MODES = ("eager", "ligerfx", "inductor")
LOSS_RTOL = 1e-2


def card_slug(card: str) -> str:
    low = card.lower()
    known = next((c for c in ("gb200", "b200", "h200", "h100", "a100", "l40s", "a10g") if c in low), None)
    return known or "".join(ch if ch.isalnum() else "-" for ch in low).strip("-") or "gpu"


def build(arch: str, tiny: bool, device: torch.device, seed: int):
    """Random-weight model of ``arch`` (fp32, SDPA attention), linearized + LoRA, in train mode."""
    if arch == "gemma-270m":
        from transformers import Gemma3ForCausalLM as Model, Gemma3TextConfig as Config
        values = {**GEMMA_270M, **(dict(TINY, num_key_value_heads=1, layer_types=["sliding_attention",
                                                                                   "full_attention"],
                                        sliding_window=16) if tiny else {})}
    elif arch == "llama-1b":
        from transformers import LlamaForCausalLM as Model, LlamaConfig as Config
        values = {**LLAMA_1B, **(TINY if tiny else {})}
    else:
        raise ValueError(f"unknown --arch {arch!r}")
    config = Config(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Model(config)
    model = ligerfx.transform(model, passes=["linearize", "lora"])
    return model.train()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_loss(model, scope: str, device: torch.device, precision: str):
    """``loss(ids, labels) -> mean CE over every next-token target``, compiled per ``scope`` by the caller."""
    if scope == "model":
        def loss(ids, labels):
            ce, _, _ = micro_step_loss(model, model, ids, labels, keep_arg=True, distill=False, temperature=1.0,
                                       device=device, precision=precision)
            return ce / labels[:, 1:].numel()
        return loss

    def loss(ids, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
    return loss


def measure(mode: str, args, device: torch.device, batch) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build(args.arch, args.tiny, device, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    if mode != "eager" and args.scope == "model":
        model = torch.compile(model, backend="ligerfx" if mode == "ligerfx" else "inductor")
    loss_fn = make_loss(model, args.scope, device, args.precision)
    if mode != "eager" and args.scope == "step":
        loss_fn = torch.compile(loss_fn, backend="ligerfx" if mode == "ligerfx" else "inductor")
    ids, labels = batch

    def step():
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return loss.detach().float().item()

    losses, times = [], []
    sync(device)
    t0 = time.perf_counter()
    losses.append(step())
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        losses.append(step())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    counters = torch._dynamo.utils.counters
    breaks = {str(k): v for k, v in counters["graph_break"].items()}
    row = dict(
        mode=mode, ms_median=round(med * 1e3, 3),
        ms_p90=round(sorted(times)[min(len(times) - 1, int(0.9 * len(times)))] * 1e3, 3),
        tokens_per_s=round(ids.numel() / med, 1), first_step_s=round(first_s, 3),
        compile_s=round(max(0.0, first_s - med), 3) if mode != "eager" else 0.0,
        peak_mem_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=int(sum(breaks.values())),
        graph_break_reasons=breaks, trainable_params=sum(p.numel() for p in params),
        losses=[round(x, 6) for x in losses], first_loss=losses[0],
    )
    return row


def free(device: torch.device):
    """Drop the last mode's compiled code and memory (its model, optimizer and graphs)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="gemma-270m", choices=["gemma-270m", "llama-1b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 model of --arch (smoke runs)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (2 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="default 1024 (64 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (default 3; 1 tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scope", default="model", choices=["model", "step"],
                    help="compile the model (loss by micro_step_loss, eager) or forward + loss as one function")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype of the forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.seq = args.seq or (64 if args.tiny else 1024)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.tiny else 3))
    args.steps = max(1, args.steps if args.steps is not None else (2 if args.tiny else 10))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {unknown}; known: {list(MODES)}")
    print("command:", " ".join(["python"] + sys.argv), flush=True)

    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    slug = card_slug(card) if device.type == "cuda" else "cpu"
    vocab = (TINY if args.tiny else GEMMA_270M if args.arch == "gemma-270m" else LLAMA_1B)["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    batch = (ids.to(device), ids.clone().to(device))
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, triton=_triton_version())
    print(f"card: {card}; {versions}; arch {args.arch}{' (tiny)' if args.tiny else ''}; B {args.batch} x T "
          f"{args.seq}; {args.precision} autocast; scope {args.scope}; warmup {args.warmup}, steps {args.steps}",
          flush=True)

    rows = []
    for mode in modes:
        base = dict(arch=args.arch + ("-tiny" if args.tiny else ""), batch=args.batch, seq=args.seq,
                    scope=args.scope, precision=args.precision, card=card, device=device.type, **versions)
        t0 = time.time()
        try:
            row = {**base, **measure(mode, args, device, batch), "status": "ok"}
        except Exception as e:  # keep the other modes
            traceback.print_exc()
            row = {**base, "mode": mode, "status": f"error: {type(e).__name__}: {e}".splitlines()[0][:500]}
        free(device)
        rows.append(row)
        print(f"[train-step] {mode}: {row.get('ms_median', '-')} ms/step ({time.time() - t0:.1f}s) {row['status']}",
              file=sys.stderr, flush=True)

    eager = next((r for r in rows if r["mode"] == "eager" and r["status"] == "ok"), None)
    for r in rows:
        ok = r["status"] == "ok" and eager is not None
        r["speedup"] = round(eager["ms_median"] / r["ms_median"], 3) if ok else None
        r["loss_rel_diff_vs_eager"] = (abs(r["first_loss"] - eager["first_loss"]) / abs(eager["first_loss"])
                                       if ok else None)
        r["loss_matches_eager"] = None if not ok else r["loss_rel_diff_vs_eager"] <= LOSS_RTOL

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.arch == "gemma-270m" else f"-{args.arch}") + ("-tiny" if args.tiny else "")
    out = out_dir / f"train-step-{slug}{suffix}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\n{card} | {args.arch}{' tiny' if args.tiny else ''} | B {args.batch} x T {args.seq} | scope "
          f"{args.scope}\n")
    print("| mode | ms/step (median) | p90 | tokens/s | speedup vs eager | compile s | peak MiB | graphs | "
          "breaks | first loss | loss = eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['mode']} | {r['status']} |||||||||")
            continue
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        print(f"| {r['mode']} | {r['ms_median']:.1f} | {r['ms_p90']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['compile_s']:.1f} | {mem} | {r['graphs']} | {r['graph_breaks']} | "
              f"{r['first_loss']:.4f} | {r['loss_matches_eager']} |")
    for r in rows:
        if r.get("graph_break_reasons"):
            print(f"graph breaks ({r['mode']}): {r['graph_break_reasons']}")
    print("wrote", out)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
