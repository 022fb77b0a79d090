"""``ligerfx train``: linearize a causal LM and LoRA-fine-tune it on instruction data (Liger's recipe by default).

    ligerfx train --model gemma-3-270m --data alpaca_52k_en.jsonl.xz -o runs/gemma-liger
    torchrun --nproc_per_node 8 -m ligerfx.cli train ...           # DDP, same global batch and data order
    ligerfx train ... --resume                                       # continue from the latest checkpoint

Defaults follow liger-method.md §4: Alpaca template, loss on responses, 1024-token packed chunks, global batch 8,
AdamW lr 1e-3 (wd 0.01), LoRA r=8 alpha=8 on q,k,v, ~20M tokens (about 2 epochs of Alpaca). Unlike the official code:
warmup + cosine schedule and gradient clipping at 1.0 (pass ``--warmup-steps 0 --min-lr-ratio 1 --max-grad-norm 0``
for the official constant, unclipped lr).
"""
from __future__ import annotations

import argparse
import sys

from .data import DataError, parse_count
from ..config import VARIANTS, sink_position as _sink_position

DEFAULT_DATA = "/work/shared/data/alpaca/alpaca_52k_en.jsonl.xz"


def _roles(text: str) -> list[str]:
    roles = [r.strip().lower() for r in text.replace(" ", ",").split(",") if r.strip()]
    bad = [r for r in roles if r not in ("q", "k", "v", "o")]
    if bad or not roles:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated roles among q,k,v,o")
    return roles


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated layer indices") from None


def _count(text: str) -> str:
    try:
        parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_duration(text: str) -> float:
    """Seconds from ``"540"``, ``"540s"``, ``"9m"``, ``"1.5h"``."""
    t = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds or a number with s/m/h, e.g. 540, 9m, 1.5h")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="local HF model directory, a .gguf file, or a packaged name (gemma-3-270m)")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="JSONL(.xz) with instruction/input/output records (or prompt/completion, or text) "
                        f"[{DEFAULT_DATA}]")
    g.add_argument("--mix-data", action="append", default=[], metavar="PATH:FRACTION",
                   help="extra corpus and its share of training chunks, e.g. "
                        "/work/shared/data/t0_train_50k/t0_train_50k.jsonl.xz:0.2 (repeatable; text records "
                        "get loss on every token, prompt/completion on the completion)")
    g.add_argument("--max-samples", type=int, default=None, help="read at most this many records per file")
    g.add_argument("--val-samples", type=int, default=200,
                   help="hold out the first N records of --data for validation loss (the official split) [200]")
    g.add_argument("--seq-len", type=int, default=1024, help="packed chunk length [1024]")
    g.add_argument("--packing", choices=("concat", "aligned"), default="concat",
                   help="concat: samples back to back, cut every seq-len tokens (the Liger recipe); aligned: every "
                        "chunk starts at a sample's BOS, the sample that overflows is cut, so the window's sink "
                        "tokens are a real start of text as at inference [concat]")
    g.add_argument("-o", "--output-dir", required=True, help="run folder: log.csv, loss.png, checkpoints, adapter")

    g = p.add_argument_group("optimization")
    g.add_argument("--max-tokens", type=_count, default="20M",
                   help="token budget (chunk tokens, all ranks); sets the schedule length; K/M/G suffixes [20M]")
    g.add_argument("--epochs", type=float, default=None,
                   help="budget in epochs of --data instead of --max-tokens (the paper: 2 epochs of Alpaca)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this optimizer step (the schedule still spans --max-tokens); resume later")
    g.add_argument("--batch-size", type=int, default=8, help="global batch in sequences [8]")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward per rank [1]")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate [1e-3]")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr [0.1]")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps [3%% of the steps]")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay [0.01, torch default]")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 disables [1.0]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--distill", action="store_true",
                   help="add w*KL(teacher||student); teacher = same weights in ligerfx.teacher_mode, LoRA off")
    g.add_argument("--distill-weight", type=float, default=1.0, help="w of the KL term [1.0]")
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--ce-weight", type=float, default=1.0,
                   help="weight of the next-token cross-entropy [1.0]; 0 with --distill trains on the teacher alone")
    g.add_argument("--attn-transfer", type=float, default=0.0, metavar="W",
                   help="add W x attention transfer (needs --distill): per linearized layer, the squared error between "
                        "the student's and the teacher's attention-module output over the target tokens, relative to "
                        "the teacher output's mean square, averaged over layers [0: off]")

    g = p.add_argument_group("LoRA and Liger")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=8)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", type=_roles, default=["q", "k", "v"], help="roles among q,k,v,o [q,k,v]")
    g.add_argument("--window", type=int, default=64, help="LigerConfig.window [64]")
    g.add_argument("--liger-mix", type=float, default=0.5, help="LigerConfig.mix: weight of the GLA branch [0.5]")
    g.add_argument("--gate-normalizer", type=float, default=16.0)
    g.add_argument("--variant", default="gla", choices=VARIANTS)
    g.add_argument("--sinks", type=int, default=None)
    g.add_argument("--sink-position", type=_sink_position, default=None,
                   help="position past which a query scores the attention sinks as if it stood there (RoPE'd at "
                        "it): an int, 'absolute' (true distances) or omitted (the model's shortest attention span - 1: "
                        "sliding_window - 1 for Gemma 3)")
    g.add_argument("--layers", type=_layers, default=None, help="comma-separated layer indices to linearize")
    g.add_argument("--only-full-attention", action="store_true")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cuda or cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="base weights dtype (LoRA weights are always fp32) [float32]")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student forward (and the --distill teacher forward) with the ligerfx "
                        "backend: far fewer kernel launches per step for small models, whose eager step is bound by "
                        "launching kernels; the first steps compile (about a minute per graph on a GPU)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the stop) [500]")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept; 0 keeps all [2]")
    g.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps (and at the end) [200]")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of --output-dir (or the given checkpoint folder)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a run folder that has checkpoints")
    g.add_argument("--time-limit", type=parse_duration, default=None, metavar="DURATION",
                   help="stop cleanly before this much wall time (540, 9m, 1.5h; counted from the start of the "
                        "command, setup included): the step that would cross it is not started, a checkpoint is "
                        "written and --resume continues. SIGTERM/SIGINT stop the same way after the current step.")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--quiet", action="store_true", help="no progress or log lines on stderr")


def check_args(args) -> str:
    """The first problem with a combination of options, or ''."""
    at, ce = getattr(args, "attn_transfer", 0.0) or 0.0, getattr(args, "ce_weight", 1.0)
    if at < 0 or ce < 0 or args.distill_weight < 0:
        return "--ce-weight, --distill-weight and --attn-transfer must be >= 0"
    if at and not args.distill:
        return "--attn-transfer compares with the teacher forward that --distill runs: add --distill " \
               "(--distill-weight 0 for attention transfer without the KL term)"
    if at and getattr(args, "compile", False):
        return "--attn-transfer reads each attention module's output through forward hooks, which --compile " \
               "does not support yet: drop one of them"
    if not ce and not (args.distill and (args.distill_weight or at)):
        return "--ce-weight 0 leaves no loss: add --distill (with a non-zero --distill-weight or --attn-transfer)"
    return ""


def run(args) -> int:
    from .trainer import train

    problem = check_args(args)
    if problem:
        print(f"ligerfx train: {problem}", file=sys.stderr)
        return 2
    if not hasattr(args, "argv"):
        args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "train" else sys.argv[1:]
    try:
        summary = train(args)
    except DataError as e:
        print(f"ligerfx train: {e}", file=sys.stderr)
        return 2
    if summary is None:
        return 1
    sig = summary.get("stopped_by_signal")
    return 128 + sig if sig else 0  # a time-limit stop is a planned stop: 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ligerfx train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
