"""``ligerfx eval``: score the teacher, a linearized model, or a linearized model + adapter with lm-eval-harness.

Examples::

    ligerfx eval --model gemma-3-270m --limit 50 --out runs/eval-teacher
    ligerfx eval --model gemma-3-270m --variant gla --mix 0.5 --limit 50
    ligerfx eval --model gemma-3-270m --variant gla --adapter runs/lora --tasks piqa,arc_easy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .tasks import DEFAULT_TASKS, MAIN_METRIC, TASKS, default_data_dir
from ..config import VARIANTS, sink_position as _sink_position

CHECKS = ("lm_eval", "generate", "consistency")
EXTRA_CHECKS = ("lambada_distance",)  # opt-in: not in the default --checks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m",
                   help="local HF dir, .gguf file, a dir saved by ligerfx, or 'gemma-3-270m' (default)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the local data sets (default: ../shared/data relative to the repo)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (int) or fraction (<1) for quick runs; also caps the generation check")
    p.add_argument("--subsample", type=int, default=None,
                   help="instead of --limit's first N: N random documents per task (seeded by --seed)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="lm-eval context length (rolling windows)")
    p.add_argument("--rolling-batch-size", type=int, default=1,
                   help="batch size for wikitext's rolling windows (max-length tokens each; with a 262k vocabulary "
                        "one window's float32 logits take ~2 GB), run as its own lm-eval call (default 1)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-samples", action="store_true",
                   help="also write each item's scores to <out>/samples/<task>.jsonl (for benchmarks/paired.py)")
    p.add_argument("--per-task", action="store_true",
                   help="run lm-eval one task at a time, writing the report after each (partial results survive)")
    p.add_argument("--softmax-dtype", default=None, help="lm-eval's softmax dtype (e.g. float32 with --dtype bf16)")
    g = p.add_argument_group("transform (omit --variant to evaluate the unchanged teacher)")
    g.add_argument("--variant", choices=VARIANTS, default=None)
    g.add_argument("--mix", type=float, default=None)
    g.add_argument("--window", type=int, default=None)
    g.add_argument("--sinks", type=int, default=None)
    g.add_argument("--sink-position", type=_sink_position, default=None,
                   help="position past which a query scores the attention sinks as if it stood there: an int, "
                        "'absolute' (true distances) or omitted (the model's shortest attention span - 1)")
    g.add_argument("--gate-normalizer", type=float, default=None)
    g.add_argument("--layers", default=None, help="comma-separated decoder-layer indices to linearize")
    g.add_argument("--only-full-attention", action="store_true")
    p.add_argument("--adapter", default=None, help="adapter dir, loaded with ligerfx.load_adapter(model, dir)")
    p.add_argument("--checks", default=",".join(CHECKS),
                   help="comma-separated subset of lm_eval,generate,consistency (default: all three), plus the "
                        "opt-in lambada_distance (LAMBADA accuracy by how far back the target word was last seen)")
    p.add_argument("--gen-limit", type=int, default=None,
                   help="LAMBADA items for the generate() check (default: --limit, else 500)")
    p.add_argument("--consistency-texts", type=int, default=4)
    p.add_argument("--consistency-tokens", type=int, default=256)
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<label>-<time>)")
    p.add_argument("--label", default=None, help="name of this run in the table (default: teacher/variant)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _split(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _saved_liger_config(adapter):
    """The ``ligerfx_config.json`` written by ``ligerfx train`` beside an adapter, as a dict (None if absent)."""
    if not adapter:
        return None
    f = Path(adapter) / "ligerfx_config.json"
    if not f.is_file():
        return None
    try:
        saved = json.loads(f.read_text())
    except ValueError as e:
        raise SystemExit(f"{f}: not valid JSON ({e})")
    if not isinstance(saved, dict):
        raise SystemExit(f"{f}: expected a JSON object")
    return saved


def liger_config_from_args(args):
    """LigerConfig from the --variant/--mix/... flags (None when the teacher is evaluated).

    With ``--adapter DIR`` holding a ``ligerfx_config.json`` (written by ``ligerfx train``), the model is transformed
    with the settings the adapter was trained with; ``--variant``/``--sinks``/... flags override single fields and
    each override is printed, so an adapter is never silently scored under settings it was not trained with.
    """
    saved = _saved_liger_config(getattr(args, "adapter", None))
    if args.variant is None and saved is None:
        extra = [n for n in ("mix", "window", "sinks", "sink_position", "gate_normalizer", "layers")
                 if getattr(args, n, None) is not None]
        if extra or args.only_full_attention:
            raise SystemExit(f"--{extra[0].replace('_', '-') if extra else 'only-full-attention'} needs --variant")
        return None
    from ligerfx import LigerConfig

    kw = {}
    if saved is not None:
        known = set(LigerConfig().to_dict()) - {"lora"}
        kw = {k: v for k, v in saved.items() if k in known}
    flags = {"variant": args.variant}
    for n in ("mix", "window", "sinks", "sink_position", "gate_normalizer"):
        flags[n] = getattr(args, n, None)
    if args.layers:
        flags["layers"] = [int(i) for i in _split(args.layers)]
    if args.only_full_attention:
        flags["only_full_attention"] = True
    if saved is not None:
        for n, v in flags.items():
            if v is not None and kw.get(n) != v:
                print(f"ligerfx eval: --{n.replace('_', '-')} {v} overrides {n}={kw.get(n)!r} from "
                      f"{Path(args.adapter) / 'ligerfx_config.json'}")
    kw.update({n: v for n, v in flags.items() if v is not None})
    return LigerConfig(**kw)


def build_model(args):
    """Load the model, apply the transform and the adapter as asked; return (model, tokenizer, meta)."""
    import ligerfx
    from ligerfx.models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    meta = {"spec": args.model, "dtype": str(next(model.parameters()).dtype), "class": type(model).__name__}
    cfg = liger_config_from_args(args)
    if cfg is not None:
        transform = getattr(ligerfx, "transform", None)
        if transform is None:
            raise SystemExit("this ligerfx build has no ligerfx.transform(); cannot evaluate --variant")
        model = transform(model, passes=["linearize"], config=cfg)
        model.eval()
        stored = getattr(model.config, "ligerfx", None) or {}  # as transform resolved it (e.g. sink_position)
        meta["transform"] = {**cfg.to_dict(), **{k: v for k, v in stored.items() if k in cfg.to_dict()}}
    if args.adapter:
        load_adapter = getattr(ligerfx, "load_adapter", None)
        if load_adapter is None:
            try:
                from ligerfx.adapters import load_adapter
            except ImportError:
                load_adapter = None
        if load_adapter is None:
            raise SystemExit("this ligerfx build has no ligerfx.load_adapter(); cannot use --adapter")
        if not Path(args.adapter).is_dir():
            raise SystemExit(f"--adapter {args.adapter}: not a directory")
        ret = load_adapter(model, args.adapter)
        if ret is not None:  # tolerate both in-place and returning implementations
            model = ret
        model.eval()
        meta["adapter"] = str(args.adapter)
    return model, tok, meta


def run(args) -> int:
    import torch

    from . import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = _split(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    checks = _split(args.checks)
    bad = [c for c in checks if c not in CHECKS + EXTRA_CHECKS]
    if bad:
        print(f"unknown check(s) {bad}; known: {', '.join(CHECKS + EXTRA_CHECKS)}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if not data_dir.is_dir():
        print(f"data dir {data_dir} not found (pass --data-dir)", file=sys.stderr)
        return 2
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)

    model, tok, meta = build_model(args)
    label = args.label or (
        "teacher" if "transform" not in meta else f"{args.variant}-mix{meta['transform'].get('mix')}"
    ) + ("+adapter" if args.adapter else "")
    out_dir = Path(args.out) if args.out else Path("runs") / f"eval-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = {
        "label": label,
        "model": meta,
        "limit": limit,
        "subsample": args.subsample,
        "data_dir": str(data_dir),
        "command": "ligerfx eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        "environment": harness.environment(),
        "tasks": {},
    }

    def save():
        paths = harness.write_report(report, out_dir)
        return paths

    if "lm_eval" in checks and tasks:
        t0 = time.time()
        lm_kwargs = {}
        if args.softmax_dtype:
            lm_kwargs["softmax_dtype"] = args.softmax_dtype
        lm = harness.make_lm(model, tok, batch_size=args.batch_size, max_length=args.max_length, **lm_kwargs)
        rolling = [t for t in tasks if TASKS[t].yaml_body.startswith("output_type: loglikelihood_rolling")]
        others = [t for t in tasks if t not in rolling]
        groups = [[t] for t in tasks] if args.per_task else [g for g in (others, rolling) if g]
        report["lm_eval_seconds"] = {}
        for group in groups:
            t1 = time.time()
            lm.batch_size_per_gpu = args.rolling_batch_size if group[0] in rolling else args.batch_size
            out = harness.run_lm_eval(model, tok, group, data_dir=data_dir, limit=limit, batch_size=args.batch_size,
                                      max_length=args.max_length, lm=lm, subsample=args.subsample, seed=args.seed,
                                      log_samples=args.log_samples)
            report["tasks"].update(harness.summarize(out))
            if args.log_samples:
                report.setdefault("samples", {}).update(harness.write_samples(out, out_dir))
            report["lm_eval_seconds"][",".join(group)] = time.time() - t1
            report["lm_eval_task_dir"] = out.get("ligerfx_task_dir")
            report.setdefault("lm_eval_versions", {}).update(out.get("versions") or {})
            save()
        save()
    if "generate" in checks:
        n = args.gen_limit if args.gen_limit is not None else (
            limit if isinstance(limit, int) else (args.subsample or 500))
        report["generation"] = harness.lambada_generate(model, tok, data_dir=data_dir, limit=n)
        save()
    if "lambada_distance" in checks:
        report["lambada_distance"] = harness.lambada_by_distance(
            model, tok, data_dir=data_dir, limit=limit if isinstance(limit, int) else None)
        save()
    if "consistency" in checks:
        report["decode_consistency"] = harness.decode_consistency(
            model, tok, data_dir=data_dir, n_texts=args.consistency_texts, max_tokens=args.consistency_tokens
        )
    paths = save()
    print(harness.markdown_table(report))
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ligerfx eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
