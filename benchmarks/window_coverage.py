"""How much of each zero-shot task fits inside the window branch: where the sink baseline *is* the teacher.

With ``window`` W and ``sinks`` S, a query sees itself, the W tokens before it and the first S tokens of the sequence
(``ligerfx/liger.py``). A scored sequence of at most ``W + 1 + S`` tokens (BOS included) is therefore seen whole at
every position: there the training-free ``swa_sinks`` variant computes exactly the teacher's softmax attention, and
ligerfx's output is ``0.5 * teacher attention + 0.5 * GLA``. On such items "above the sink baseline" means "above the
teacher". This script counts, per task, the items whose *longest* scored sequence (context + the longest choice, as
lm-eval scores it with the prompts of ``ligerfx.evaluation.tasks``) fits, using the model's tokenizer, and writes a
table and a JSON:

    python benchmarks/window_coverage.py --model gemma-3-270m --out docs/results/quality/checks/window_coverage.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ligerfx.evaluation import tasks as T  # noqa: E402


def scored_texts(task: str, doc: dict) -> List[str]:
    """The full texts (context + continuation) lm-eval scores for one document of ``task``."""
    if task == "piqa":
        return [f"Question: {doc['goal']}\nAnswer: {s}" for s in (doc["sol1"], doc["sol2"])]
    if task in ("arc_easy", "arc_challenge"):
        return [f"Question: {doc['question']}\nAnswer: {c}" for c in doc["choices"]["text"]]
    if task == "hellaswag":
        return [f"{doc['query']} {c}" for c in doc["choices"]]
    if task == "winogrande":
        i = doc["sentence"].index("_")
        rest = doc["sentence"][i + 1:].strip()
        return [f"{doc['sentence'][:i]}{o} {rest}" for o in (doc["option1"], doc["option2"])]
    if task == "lambada_openai":
        return [doc["text"]]
    raise ValueError(f"window_coverage: no prompt format for task {task!r}")


def longest_lengths(task: str, docs: Iterable[dict], count: Callable[[str], int]) -> np.ndarray:
    """Per document, the token count (BOS included, ``count`` gives it) of its longest scored sequence."""
    return np.asarray([max(count(t) for t in scored_texts(task, d)) for d in docs], dtype=np.int64)


def coverage(lengths: np.ndarray, window: int, sinks: int) -> Dict[str, float]:
    """Share of items (%) seen whole by the window branch, and length quantiles."""
    fit = window + 1 + sinks
    return {"n": int(len(lengths)), "fits_tokens": fit, "fits_pct": round(100.0 * float((lengths <= fit).mean()), 2),
            "median_tokens": float(np.median(lengths)), "p90_tokens": float(np.percentile(lengths, 90))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="model (for its tokenizer): folder, .gguf or packaged name")
    p.add_argument("--data-dir", default=None, help="local task data [../shared/data]")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON to write")
    args = p.parse_args(argv)

    from ligerfx.models import load_tokenizer

    tok = load_tokenizer(args.model)
    bos = 1 if tok.bos_token_id is not None else 0

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"]) + bos

    data_dir = Path(args.data_dir) if args.data_dir else T.default_data_dir()
    out = {"model": args.model, "window": args.window, "sinks": args.sinks, "tasks": {}}
    print(f"| task | items | seen whole (<= {args.window + 1 + args.sinks} tokens) | median tokens | p90 tokens |")
    print("|---|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        spec = T.TASKS.get(task)
        if spec is None:
            p.error(f"--tasks: unknown task {task!r} (known: {', '.join(T.TASKS)})")
        try:
            docs = list(spec.convert(data_dir))
        except FileNotFoundError as e:
            p.error(f"--data-dir {data_dir}: {e}")
        c = coverage(longest_lengths(task, docs, count), args.window, args.sinks)
        out["tasks"][task] = c
        print(f"| {task} | {c['n']} | {c['fits_pct']:.1f} % | {c['median_tokens']:.0f} | {c['p90_tokens']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
