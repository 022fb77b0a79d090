"""Quick quality check of a Liger adapter: held-out Alpaca loss and WikiText-2 perplexity of three models.

    python examples/quick_quality.py --adapter examples/adapters/gemma-3-270m-liger-gla --out quality.json

Measures, with the same weights:

1. the teacher (the original softmax-attention model),
2. the linearized model without training (``ligerfx.transform(model, passes=["linearize"])``),
3. the linearized model with the LoRA adapter (``ligerfx.load_adapter``),

on (a) the held-out Alpaca records (the first ``--val-samples`` records, which ``ligerfx train`` never trains on:
mean loss per response token over the records packed in order into ``--seq-len`` pieces, exactly the trainer's
validation loss) and (b) WikiText-2 test perplexity over the first ``--wikitext-tokens`` tokens in non-overlapping
``--seq-len`` windows (as ``benchmarks/gemma_check.py``). On CUDA the forward passes run under bf16 autocast over
fp32 weights, like training; on CPU in fp32. No lm-eval here (that is ``ligerfx eval``).

The Liger settings come from the adapter folder's ``ligerfx_config.json`` (else ``training_args.json``, else the
defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ligerfx
from ligerfx.models import load_model
from ligerfx.training.data import pack_in_order, read_records, tokenize_records
from ligerfx.training.trainer import DistInfo, autocast_context, evaluate

ALPACA = "/work/shared/data/alpaca/alpaca_52k_en.jsonl.xz"
WIKITEXT = "/work/shared/data/wikitext2/wiki.test.raw"


def liger_config(adapter: Path | None) -> ligerfx.LigerConfig:
    if adapter is not None:
        if (adapter / "ligerfx_config.json").is_file():
            return ligerfx.LigerConfig.from_dict(json.loads((adapter / "ligerfx_config.json").read_text()))
        if (adapter / "training_args.json").is_file():
            return ligerfx.LigerConfig.from_dict(json.loads((adapter / "training_args.json").read_text())["liger_config"])
    return ligerfx.LigerConfig()


@torch.no_grad()
def wikitext_ppl(model, ids: torch.Tensor, seq_len: int, precision: str) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` predicted tokens (each window restarts the context)."""
    nll, n = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, ids.shape[1] - 1, seq_len):
        x = ids[:, s:s + seq_len + 1].to(device)
        if x.shape[1] < 2:
            break
        with autocast_context(device, precision):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        nll += F.cross_entropy(logits.float()[0], x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--adapter", default=None, help="peft adapter folder (skip the third model if omitted)")
    p.add_argument("--data", default=ALPACA, help=f"Alpaca JSONL(.xz) [{ALPACA}]")
    p.add_argument("--val-samples", type=int, default=200, help="held-out records: the first N [200]")
    p.add_argument("--wikitext", default=WIKITEXT, help=f"WikiText-2 raw test file [{WIKITEXT}]")
    p.add_argument("--wikitext-tokens", type=int, default=16384, help="tokens of WikiText-2 to score [16384]")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="weights dtype [float32]")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precision = "bf16" if device.type == "cuda" else "fp32"
    adapter = Path(args.adapter) if args.adapter else None
    t_start = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=device)

    _, records = read_records(args.data, limit=args.val_samples)
    pieces = pack_in_order(tokenize_records(records[:args.val_samples], tok), args.seq_len)
    text = Path(args.wikitext).read_text(encoding="utf-8")[: args.wikitext_tokens * 8]
    wiki = tok(text, return_tensors="pt").input_ids[:, : args.wikitext_tokens]
    info = DistInfo(0, 1, 0, device)

    def measure(name):
        t0 = time.time()
        r = {"alpaca_val_loss": evaluate(model, pieces, info, precision, keep_arg=True),
             "wikitext2_ppl": wikitext_ppl(model, wiki, args.seq_len, precision)}
        r["alpaca_val_ppl"] = math.exp(r["alpaca_val_loss"])
        print(f"{name:22s} alpaca val loss {r['alpaca_val_loss']:.4f} (ppl {r['alpaca_val_ppl']:.2f})   "
              f"WikiText-2 ppl {r['wikitext2_ppl']:.2f}   [{time.time() - t0:.1f}s]", flush=True)
        return r

    cfg = liger_config(adapter)
    results = {
        "model": args.model, "adapter": str(adapter) if adapter else None, "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "weights_dtype": args.dtype, "torch": torch.__version__,
        "alpaca": {"file": args.data, "val_records": len(records[:args.val_samples]), "pieces": len(pieces),
                   "target_tokens": int(sum((lab[1:] != -100).sum() for _, lab in pieces))},
        "wikitext2": {"file": args.wikitext, "tokens": int(wiki.shape[1]), "window": args.seq_len},
        "liger_config": cfg.to_dict(),
    }
    model.eval()
    results["teacher"] = measure("teacher")
    ligerfx.transform(model, passes=["linearize"], config=cfg)
    results["linearized"] = measure("linearized (untrained)")
    if adapter is not None:
        ligerfx.load_adapter(model, adapter)
        results["linearized+lora"] = measure("linearized + adapter")
    results["wall_s"] = round(time.time() - t_start, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
