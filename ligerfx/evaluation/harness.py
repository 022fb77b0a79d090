"""Score a model object with lm-eval-harness on the local task copies, plus decode-path checks.

* :func:`run_lm_eval` wraps ``lm_eval.simple_evaluate`` with lm-eval's own ``HFLM`` around our (possibly linearized)
  model object; scoring is entirely lm-eval's.
* :func:`lambada_generate` measures LAMBADA last-word accuracy through ``model.generate()`` (greedy), i.e. the
  KV-cache / recurrent-state decode path, which lm-eval's log-likelihood scoring never touches.
* :func:`decode_consistency` compares logits of step-by-step decoding against one full forward on real text.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import string
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from .tasks import DEFAULT_TASKS, MAIN_METRIC, TASKS, default_data_dir, prepare_tasks

PERCENT_METRICS = {"acc", "acc_norm"}


def make_lm(model, tokenizer, batch_size: int = 8, max_length: Optional[int] = 2048, **kwargs):
    """lm-eval's ``HFLM`` around an already-built model object."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    data_dir: Optional[os.PathLike] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_length: Optional[int] = 2048,
    num_fewshot: int = 0,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    cache: Optional[os.PathLike] = None,
    lm=None,
    subsample: Optional[int] = None,
    seed: int = 1234,
    samples: Optional[Dict[str, List[int]]] = None,
) -> Dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on the local tasks; return lm-eval's result dict (``results``, ``samples``...).

    ``limit``: lm-eval's first-N (or fraction) per task. ``subsample``: instead, N documents per task drawn at random
    (seeded, without replacement, kept in file order) and passed to lm-eval as ``samples=``: a representative
    subset for quick runs on slow machines. ``samples``: explicit ``{task: [doc indices]}`` (lm-eval's ``samples=``).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = prepare_tasks(tasks, data_dir, cache)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    if lm is None:
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    if subsample is not None:
        if limit is not None or samples is not None:
            raise ValueError("give either limit or subsample, not both")
        samples = subsample_indices(tasks, include, subsample, seed)
    with scoring_without_cache(model if model is not None else getattr(lm, "model", None)):
        out = lm_eval.simple_evaluate(
            samples=samples,
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            batch_size=batch_size,
        )
    out["ligerfx_task_dir"] = str(include)
    return out


@contextlib.contextmanager
def scoring_without_cache(model):
    """``model.config.use_cache = False`` for the duration (restored after, also on error).

    lm-eval scores with ``model(input_ids)``, so HF falls back to ``config.use_cache`` (True) and builds a cache
    that log-likelihood scoring never reads: a ``DynamicCache`` for the teacher, and for a linearized model a Liger
    cache per layer, whose prefill path (ring writes, state hand-off, history compaction) costs more than the
    cache-free forward. The logits are the same either way (tested); this suite has no generation task."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "use_cache"):
        yield
        return
    before = cfg.use_cache
    cfg.use_cache = False
    try:
        yield
    finally:
        cfg.use_cache = before


def subsample_indices(tasks: Sequence[str], include: Path, n: int, seed: int = 1234) -> Dict[str, List[int]]:
    """``{task: sorted random doc indices}`` (``n`` per task, fewer when the task is smaller)."""
    import random

    out = {}
    for t in tasks:
        data_file = json.loads((Path(include) / "data_files.json").read_text())[t]
        with open(data_file, encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())
        rng = random.Random(f"{seed}:{t}")
        out[t] = sorted(rng.sample(range(total), min(n, total)))
    return out


def summarize(lm_out: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """``{task: {metric: value, metric_stderr: value, n: count}}``; acc/acc_norm in percent, perplexities raw."""
    res = {}
    n_samples = lm_out.get("n-samples", {})
    for task, metrics in lm_out["results"].items():
        row = {}
        for key, val in metrics.items():
            if "," not in key or not isinstance(val, (int, float)):
                continue
            name, _filter = key.split(",", 1)
            base = name[: -len("_stderr")] if name.endswith("_stderr") else name
            scale = 100.0 if base in PERCENT_METRICS else 1.0
            row[name] = float(val) * scale
        ns = n_samples.get(task, {})
        if ns:
            row["n"] = int(ns.get("effective", ns.get("original", 0)))
        res[task] = row
    return res


# ------------------------------------------------------------------------------------------------- decode checks


def _lambada_items(data_dir: Path, limit: Optional[int]) -> List[dict]:
    p = Path(data_dir) / "lambada_openai/lambada_openai_test.jsonl"
    items = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                items.append(json.loads(line))
            if limit is not None and len(items) >= limit:
                break
    return items


def _strip_punct(w: str) -> str:
    return w.strip().strip(string.punctuation + "“”‘’\"'")


def last_mention_distance(tokenizer, context: str, word: str) -> Optional[int]:
    """Tokens from the start of ``word``'s last whole-word mention in ``context`` (punctuation and case ignored) to the
    end of the context, counted with the tokenizer; None if the passage never mentions it."""
    hits = [m.start() for m in re.finditer(r"\S+", context) if _strip_punct(m.group()).lower() == word.lower()]
    if not hits:
        return None
    return len(tokenizer(context).input_ids) - len(tokenizer(context[:hits[-1]].rstrip()).input_ids)


def distance_bucket(tokenizer, item: dict, near: int) -> str:
    """``"near"`` / ``"far"`` / ``"absent"``: where a LAMBADA item's target word was last mentioned (see
    :func:`last_mention_distance`; near = at most ``near`` tokens before the end of the context)."""
    dist = last_mention_distance(tokenizer, item["context"], item["continuation"])
    return "absent" if dist is None else "near" if dist <= near else "far"


@torch.no_grad()
def lambada_by_distance(model, tokenizer, data_dir: Optional[os.PathLike] = None, limit: Optional[int] = None,
                        near: int = 60) -> Dict[str, Any]:
    """LAMBADA accuracy split by where the target word last appears in the passage.

    Accuracy is lm-eval's ``acc`` (teacher-forced: the greedy token at every position of ``" " + word`` is right),
    from one uncached forward per item. Buckets: the word's last mention starts at most ``near`` tokens before the
    end of the context (a 64-token window still sees it), further back (only a recurrent state or full attention
    can), or never (the word must be inferred). Shows which part of a model's LAMBADA score the window carries."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    items = _lambada_items(data_dir, limit)
    dev = next(model.parameters()).device
    t0 = time.time()
    buckets = {"near": [], "far": [], "absent": []}
    for it in _progress(items, "LAMBADA by distance"):
        ctx = tokenizer(it["context"]).input_ids
        tgt = tokenizer(" " + it["continuation"], add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + tgt], device=dev)
        pred = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1].argmax(-1)
        ok = bool((pred == ids[0, len(ctx):]).all())
        buckets[distance_bucket(tokenizer, it, near)].append(ok)
    n = sum(len(v) for v in buckets.values())
    return {
        "n": n, "near": near, "seconds": time.time() - t0,
        "acc": 100.0 * sum(sum(v) for v in buckets.values()) / max(n, 1),
        "buckets": {k: {"n": len(v), "acc": 100.0 * sum(v) / len(v) if v else None} for k, v in buckets.items()},
    }


@torch.no_grad()
def lambada_generate(model, tokenizer, data_dir: Optional[os.PathLike] = None, limit: Optional[int] = 500,
                     extra_tokens: int = 2) -> Dict[str, Any]:
    """LAMBADA last-word accuracy by greedy ``model.generate()``, one item at a time (no padding).

    For each item the prompt is the context (tokenized with the tokenizer's default special tokens, like lm-eval)
    and ``len(tokens(" " + word)) + extra_tokens`` new tokens are generated greedily.

    * ``acc_token``: the first generated tokens equal the tokens of ``" " + word`` (lm-eval's ``acc`` definition, so
      it should equal lm-eval's log-likelihood ``acc`` on the same items up to exact logit ties);
    * ``acc_word``: the first whitespace-separated generated word equals the target, punctuation stripped.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    items = _lambada_items(data_dir, limit)
    dev = next(model.parameters()).device
    ok_tok = ok_word = 0
    t0 = time.time()
    bar = _progress(items, "LAMBADA generate()")
    for i, it in enumerate(bar):
        ctx = tokenizer(it["context"], return_tensors="pt").input_ids.to(dev)
        tgt = tokenizer(" " + it["continuation"], add_special_tokens=False).input_ids
        out = model.generate(
            ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=len(tgt) + extra_tokens, do_sample=False,
            num_beams=1, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new = out[0, ctx.shape[1]:].tolist()
        ok_tok += int(new[: len(tgt)] == tgt)
        words = tokenizer.decode(new, skip_special_tokens=True).split()
        ok_word += int(bool(words) and _strip_punct(words[0]) == _strip_punct(it["continuation"]))
        bar.set_postfix(acc_token=f"{100.0 * ok_tok / (i + 1):.1f}", refresh=False)
    n = max(len(items), 1)
    return {
        "n": len(items),
        "acc_token": 100.0 * ok_tok / n,
        "acc_word": 100.0 * ok_word / n,
        "seconds": time.time() - t0,
    }


def _progress(items, desc: str):
    """A tqdm bar on stderr (updated at most every 5 s, so logs of long CPU runs stay short)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, mininterval=5.0, file=sys.stderr)


def _cache_kwarg(model) -> str:
    """``"cache"`` on transformers versions that renamed ``past_key_values`` (5.2x), else ``"past_key_values"``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _default_texts(data_dir: Path, n: int) -> List[str]:
    """Real text for the consistency check: the first ``n`` WikiText-2 test articles (detokenized like lm-eval's
    wikitext task; thousands of tokens each), else LAMBADA passages when the WikiText file is absent."""
    from .lmeval_utils import wikitext_detokenizer
    from .tasks import wikitext_pages

    wiki = Path(data_dir) / "wikitext2/wiki.test.raw"
    if wiki.is_file():
        pages = wikitext_pages(wiki.read_text(encoding="utf-8"))[:n]
        return [wikitext_detokenizer({"page": p}).strip() for p in pages]
    return [it["context"] + " " + it["continuation"] for it in _lambada_items(data_dir, n)]


@torch.no_grad()
def decode_consistency(model, tokenizer, texts: Optional[Sequence[str]] = None, data_dir: Optional[os.PathLike] = None,
                       n_texts: int = 4, max_tokens: int = 256, prefill: Sequence[int] = (1, 100)) -> Dict[str, Any]:
    """Compare logits of cached step-by-step decoding with one full (uncached) forward over the same tokens.

    For each text (``max_tokens`` tokens at most) and each prefill length ``p``: the first ``p`` tokens are run in one
    cached forward, then every further token is fed alone with ``past_key_values``; the logits of all positions are
    compared with ``model(input_ids).logits``. Reports max / mean absolute difference (over all positions and the
    whole vocabulary) and the rate at which the argmax agrees.
    """
    if texts is None:
        texts = _default_texts(Path(data_dir) if data_dir is not None else default_data_dir(), n_texts)
    dev = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    per = []
    max_abs = 0.0
    max_logit = 0.0
    sum_abs = 0.0
    count = 0
    agree = 0
    positions = 0
    for text in _progress(texts, "decode vs full forward"):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(dev)
        T = ids.shape[1]
        full = model(ids, use_cache=False).logits.float()
        max_logit = max(max_logit, full.abs().max().item())
        for p in prefill:
            p = max(1, min(int(p), T))
            out = model(ids[:, :p], use_cache=True)
            past = _cache_of(out)
            steps = [out.logits.float()]
            for t in range(p, T):
                out = model(ids[:, t : t + 1], **{cache_kw: past}, use_cache=True)
                past = _cache_of(out)
                steps.append(out.logits.float())
            inc = torch.cat(steps, dim=1)
            diff = (inc - full).abs()
            m, s = diff.max().item(), diff.sum().item()
            a = (inc.argmax(-1) == full.argmax(-1)).sum().item()
            per.append({"tokens": T, "prefill": p, "max_abs": m, "mean_abs": s / diff.numel(), "argmax_agree": a / T})
            max_abs = max(max_abs, m)
            sum_abs += s
            count += diff.numel()
            agree += a
            positions += T
    return {
        "n_texts": len(texts),
        "max_tokens": max_tokens,
        "prefill": list(prefill),
        "max_abs_diff": max_abs,
        "mean_abs_diff": sum_abs / max(count, 1),
        "argmax_agreement": 100.0 * agree / max(positions, 1),
        "max_abs_logit": max_logit,
        "per_text": per,
    }


# ------------------------------------------------------------------------------------------------- reporting


def environment() -> Dict[str, Any]:
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import lm_eval

        info["lm_eval"] = lm_eval.__version__
    except Exception:  # pragma: no cover
        pass
    return info


def _fmt(v, pct=True):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if pct else f"{v:.3f}"


def markdown_table(report: Dict[str, Any]) -> str:
    """One markdown table of every task/metric in ``report`` (the dict :func:`ligerfx.evaluation.cli.run` writes)."""
    lines = [f"### {report.get('label', 'model')}", ""]
    meta = report.get("model", {})
    env = report.get("environment", {})
    lines.append(
        f"model `{meta.get('spec')}`"
        + (f", transform `{json.dumps(meta.get('transform'))}`" if meta.get("transform") else "")
        + (f", adapter `{meta.get('adapter')}`" if meta.get("adapter") else "")
        + (f", random subsample of {report['subsample']} per task" if report.get("subsample") else
           f", limit {report.get('limit')}")
        + f", {env.get('device', '?')}, {env.get('date', '')}"
    )
    lines += ["", "| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for task, row in report.get("tasks", {}).items():
        spec = TASKS.get(task)
        metrics = spec.metrics if spec else [k for k in row if not k.endswith("_stderr") and k != "n"]
        for m in metrics:
            if m not in row:
                continue
            pct = m in PERCENT_METRICS
            main = "**" if MAIN_METRIC.get(task) == m else ""
            lines.append(
                f"| {task} | {main}{m}{main} | {_fmt(row[m], pct)} | {_fmt(row.get(m + '_stderr'), pct)} | "
                f"{row.get('n', '')} |"
            )
    gen = report.get("generation")
    if gen:
        lines.append(f"| lambada_openai (generate) | acc_token | {_fmt(gen['acc_token'])} | - | {gen['n']} |")
        lines.append(f"| lambada_openai (generate) | acc_word | {_fmt(gen['acc_word'])} | - | {gen['n']} |")
    ld = report.get("lambada_distance")
    if ld:
        for k, label in (("near", f"last mention ≤ {ld['near']} tokens back"),
                         ("far", f"last mention > {ld['near']} tokens back"), ("absent", "word not in passage")):
            b = ld["buckets"][k]
            lines.append(f"| lambada_openai ({label}) | acc | {_fmt(b['acc'])} | - | {b['n']} |")
    dc = report.get("decode_consistency")
    if dc:
        lines += [
            "",
            f"Decode vs full-forward logits ({dc['n_texts']} texts, ≤{dc['max_tokens']} tokens, prefill "
            f"{dc['prefill']}): max |Δ| = {dc['max_abs_diff']:.3g}, mean |Δ| = {dc['mean_abs_diff']:.3g}, "
            f"argmax agreement {dc['argmax_agreement']:.2f}%",
        ]
    return "\n".join(lines) + "\n"


def write_samples(lm_out: Dict[str, Any], out_dir: os.PathLike) -> Dict[str, str]:
    """Per-item scores of an lm-eval run (``log_samples=True``) to ``<out_dir>/samples/<task>.jsonl``: one line per
    document, ``{"doc_id": i, <metric>: value, ...}`` for the metrics lm-eval scored per item as a number (acc,
    acc_norm; a perplexity's (loglik, count) pair is kept as a list), for paired comparisons of two models
    (``benchmarks/paired.py``). Returns ``{task: path relative to out_dir}``."""
    out = Path(out_dir) / "samples"
    paths = {}
    for task, rows in (lm_out.get("samples") or {}).items():
        out.mkdir(parents=True, exist_ok=True)
        p = out / f"{task}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for r in sorted(rows, key=lambda r: r["doc_id"]):
                item = {"doc_id": int(r["doc_id"])}
                for m in r.get("metrics", []):
                    v = r.get(m)
                    if isinstance(v, bool) or isinstance(v, (int, float)):
                        item[m] = float(v)
                    elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
                        item[m] = [float(x) for x in v]
                f.write(json.dumps(item) + "\n")
        paths[task] = str(p.relative_to(out_dir))
    return paths


def write_report(report: Dict[str, Any], out_dir: os.PathLike, stem: str = "eval") -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    mp.write_text(markdown_table(report), encoding="utf-8")
    return {"json": jp, "markdown": mp}
