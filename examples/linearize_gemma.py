"""Linearize Gemma-3-270M into Liger attention and recover it with LoRA on Alpaca (the Liger recipe), then compare.

    python examples/linearize_gemma.py                          # full run: ~20M tokens, lr 1e-3, LoRA r=8 on q,k,v
    torchrun --nproc_per_node 8 examples/linearize_gemma.py     # the same run with DDP (same data order and loss)
    python examples/linearize_gemma.py --resume                 # continue after an interruption
    python examples/linearize_gemma.py --smoke                  # CPU smoke test: a few short steps
    python examples/linearize_gemma.py --skip-train             # only the comparison, on an existing run folder

Any ``ligerfx train`` option can be added (``--epochs 2``, ``--distill``, ``--lora-targets q,k,v,o``, ...).

After training, on the held-out Alpaca records (the first ``--val-samples``), it reports the loss per response token
of (1) the original softmax model (the teacher), (2) the linearized model without LoRA, (3) the linearized model with
the trained adapter, and generates one answer with (3). The adapter lives in the run folder in peft format:

    model = ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(**json.load(ligerfx_config.json)))
    ligerfx.adapters.load_adapter(model, run_folder)            # or peft.PeftModel.from_pretrained(model, run_folder)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import ligerfx
from ligerfx.adapters import load_adapter
from ligerfx.training import cli
from ligerfx.training.data import alpaca_prompt, pack_in_order, read_records, tokenize_records
from ligerfx.training.trainer import (DistInfo, evaluate, latest_checkpoint, load_model_and_tokenizer,
                                     resolve_precision)

MODEL = "gemma-3-270m"
SMOKE = ["--seq-len", "128", "--batch-size", "2", "--max-tokens", str(4 * 2 * 128), "--max-samples", "300",
         "--val-samples", "8", "--save-every", "2", "--eval-every", "0"]


def compare(run_dir: Path, device: torch.device) -> dict:
    """Held-out loss of teacher / linearized / linearized + LoRA, and one generated answer."""
    meta = json.loads((run_dir / "training_args.json").read_text())
    args = meta["args"]
    config = ligerfx.LigerConfig.from_dict(meta["liger_config"])
    adapter_dir = run_dir if (run_dir / "adapter_model.safetensors").is_file() else latest_checkpoint(run_dir)
    if adapter_dir is None:
        raise SystemExit(f"{run_dir}: no adapter and no checkpoint yet")
    info = DistInfo(0, 1, 0, device)
    precision = resolve_precision(args["precision"], device)

    model, tokenizer = load_model_and_tokenizer(args["model"], args["dtype"], device)
    _, records = read_records(args["data"], limit=args["val_samples"])
    pieces = pack_in_order(tokenize_records(records[:args["val_samples"]], tokenizer), args["seq_len"])
    if not pieces:
        raise SystemExit("no validation records (--val-samples 0): nothing to compare")

    def loss():
        return evaluate(model, pieces, info, precision, keep_arg=True)

    results = {"teacher": loss()}
    ligerfx.transform(model, passes=["linearize"], config=config)
    results["linearized"] = loss()
    load_adapter(model, adapter_dir)
    results["linearized+lora"] = loss()

    print(f"\nheld-out loss on the first {args['val_samples']} records of {args['data']} ({len(pieces)} chunks), "
          f"adapter {adapter_dir}:")
    for name, value in results.items():
        print(f"  {name:18s} {value:.4f}  (ppl {math.exp(value):.2f})")

    prompt = alpaca_prompt("Give three tips for staying healthy.")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    model.eval()
    with torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=64, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n{prompt}{answer}\n")
    results["sample"] = answer
    (run_dir / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("--smoke", action="store_true", help="a few short CPU-sized steps")
    p.add_argument("--skip-train", action="store_true", help="only compare, using the run folder's adapter")
    p.add_argument("--no-compare", action="store_true", help="only train")
    own, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        print("\nplus every option of `ligerfx train`:")
        cli.main(["--help"])
        return 0

    out = "runs/gemma-3-270m-liger-smoke" if own.smoke else "runs/gemma-3-270m-liger"
    train_argv = ["--model", MODEL, "-o", out] + (SMOKE if own.smoke else []) + rest
    parser = argparse.ArgumentParser(prog="linearize_gemma.py")
    cli.add_arguments(parser)
    args = parser.parse_args(train_argv)
    args.argv = train_argv

    if not own.skip_train:
        rc = cli.run(args)
        if rc:
            return rc
    if int(os.environ.get("RANK", "0")) != 0 or own.no_compare:
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    compare(Path(args.output_dir), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
