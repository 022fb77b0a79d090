"""lm-eval task definitions for the local copies of the evaluation sets (``../shared/data``).

Each task is lm-eval's standard task (same ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``, output type and
metrics, checked against lm-eval 0.4.13's YAMLs) with ``dataset_path: json`` pointing at a JSONL file converted from
the local file into the schema the standard YAML expects. Nothing is downloaded.

Differences from lm-eval's data (documented in docs/RESULTS.md as well):

* ``hellaswag``: the only local copy is the already-preprocessed text file llama.cpp uses (klosax/hellaswag_text_data):
  ``activity_label: ctx`` with WikiHow brackets removed. lm-eval builds ``activity_label: ctx_a + " " +
  ctx_b.capitalize()``; the ``ctx_a``/``ctx_b`` split is lost here, so ``ctx_b`` is *not* capitalised. lm-eval's
  ``preprocess`` is applied again (a no-op except for a handful of leftover ``[...]``).
* ``wikitext``: lm-eval uses ``EleutherAI/wikitext_document_level`` (one doc per article, raw lines incl. blank
  ``" "`` lines). The local file lacks the blank lines; articles are split at top-level ``" = Title = "`` headings and
  a blank ``" "`` line is put back before and after every heading. Scoring, detokenizer and word counts are lm-eval's.
* ``arc_easy`` / ``arc_challenge``: AI2's official test split from the original CSV release (same items as
  ``allenai/ai2_arc`` test); 3- and 5-option items kept as they are, as in lm-eval.
* ``piqa``: validation split, labels from ``valid-labels.lst``; ``winogrande``: xl dev (= lm-eval's validation);
  ``lambada_openai``: text = ``context + " " + continuation`` (lm-eval splits on the last space again).
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

CONVERTER_VERSION = "1"
UTILS = "ligerfx.evaluation.lmeval_utils"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    sources: tuple  # paths relative to data_dir
    split: str  # the split name the YAML evaluates on
    yaml_body: str  # everything but task/dataset lines
    convert: Callable[[Path], Iterable[dict]] = field(compare=False)
    metrics: tuple = ()  # metrics we report (lm-eval names)


def _jsonl(p: Path) -> List[dict]:
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------- converters


def convert_piqa(data_dir: Path):
    items = _jsonl(data_dir / "piqa/valid.jsonl")
    labels = [int(x) for x in (data_dir / "piqa/valid-labels.lst").read_text().split()]
    if len(items) != len(labels):
        raise ValueError(f"piqa: {len(items)} items but {len(labels)} labels")
    for it, lab in zip(items, labels):
        yield {"goal": it["goal"], "sol1": it["sol1"], "sol2": it["sol2"], "label": lab}


def _convert_arc(path: Path):
    for it in _jsonl(path):
        q = it["question"]
        yield {
            "id": it["id"],
            "question": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
            "answerKey": it["answerKey"],
        }


def convert_arc_easy(data_dir: Path):
    return _convert_arc(data_dir / "arc_easy/ARC-Easy-Test.jsonl")


def convert_arc_challenge(data_dir: Path):
    return _convert_arc(data_dir / "arc_challenge/ARC-Challenge-Test.jsonl")


def convert_hellaswag(data_dir: Path):
    from .lmeval_utils import hellaswag_preprocess

    p = data_dir / "hellaswag/hellaswag_val_full.txt.bz2"
    lines = bz2.open(p, "rt", encoding="utf-8").read().rstrip("\n").split("\n")
    if len(lines) % 6:
        raise ValueError(f"{p}: {len(lines)} lines, not a multiple of 6")
    for i in range(0, len(lines), 6):
        yield {
            "query": hellaswag_preprocess(lines[i]),
            "choices": [hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
            "label": str(int(lines[i + 1])),
        }


def convert_winogrande(data_dir: Path):
    for it in _jsonl(data_dir / "winogrande/dev.jsonl"):
        yield {k: it[k] for k in ("qID", "sentence", "option1", "option2", "answer")}


def convert_lambada(data_dir: Path):
    for it in _jsonl(data_dir / "lambada_openai/lambada_openai_test.jsonl"):
        yield {"text": it["context"] + " " + it["continuation"]}


_HEADING = re.compile(r"^ (= )+.*?(= )+$")
_TOP_HEADING = re.compile(r"^ = [^=]")


def wikitext_pages(text: str) -> List[str]:
    """Split the local wiki.test.raw (non-empty lines only) into lm-eval-style article pages."""
    pages, cur = [], []
    for line in text.split("\n"):
        if line == "":
            continue
        if _TOP_HEADING.match(line) and cur:
            pages.append(cur)
            cur = []
        if _HEADING.match(line):
            cur += [" ", line, " "] if not cur or cur[-1] != " " else [line, " "]
        else:
            cur.append(line)
    if cur:
        pages.append(cur)
    return ["\n".join(p) + "\n" for p in pages]


def convert_wikitext(data_dir: Path):
    text = (data_dir / "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    for page in wikitext_pages(text):
        yield {"page": page}


# --------------------------------------------------------------------------------------------------- task YAMLs

_MC_ACC = """output_type: multiple_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _mc(text: str, target: str, choice: str) -> str:
    """Body of a multiple-choice task YAML scored with acc and acc_norm (lm-eval's standard keys)."""
    return f'doc_to_text: "{text}"\ndoc_to_target: {target}\ndoc_to_choice: {choice}\n' + _MC_ACC


_ARC = _mc("Question: {{question}}\\nAnswer:", '"{{choices.label.index(answerKey)}}"', '"{{choices.text}}"')

TASKS: Dict[str, TaskSpec] = {
    "piqa": TaskSpec(
        "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
        _mc("Question: {{goal}}\\nAnswer:", "label", '"{{[sol1, sol2]}}"'), convert_piqa, ("acc", "acc_norm"),
    ),
    "arc_easy": TaskSpec(
        "arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",), "test", _ARC, convert_arc_easy, ("acc", "acc_norm"),
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", ("arc_challenge/ARC-Challenge-Test.jsonl",), "test", _ARC, convert_arc_challenge,
        ("acc", "acc_norm"),
    ),
    "hellaswag": TaskSpec(
        "hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), "validation",
        _mc("{{query}}", '"{{label}}"', '"choices"'), convert_hellaswag, ("acc", "acc_norm"),
    ),
    "winogrande": TaskSpec(
        "winogrande", ("winogrande/dev.jsonl",), "validation",
        f"doc_to_text: !function {UTILS}.winogrande_doc_to_text\n"
        f"doc_to_target: !function {UTILS}.winogrande_doc_to_target\n"
        f"doc_to_choice: !function {UTILS}.winogrande_doc_to_choice\n"
        "output_type: multiple_choice\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        convert_winogrande, ("acc",),
    ),
    "lambada_openai": TaskSpec(
        "lambada_openai", ("lambada_openai/lambada_openai_test.jsonl",), "test",
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        convert_lambada, ("acc", "perplexity"),
    ),
    "wikitext": TaskSpec(
        "wikitext", ("wikitext2/wiki.test.raw",), "test",
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        f"doc_to_target: !function {UTILS}.wikitext_detokenizer\n"
        f"process_results: !function {UTILS}.wikitext_process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        convert_wikitext, ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    ),
}

DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "wikitext")

# metric shown in the one-number summary of each task (what papers quote)
MAIN_METRIC = {
    "piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc",
    "lambada_openai": "acc", "wikitext": "word_perplexity",
}


def default_data_dir() -> Path:
    """``$LIGERFX_DATA_DIR``, else ``../shared/data`` relative to the repository root (then to the cwd)."""
    env = os.environ.get("LIGERFX_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for base in (repo, Path.cwd()):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand.is_dir():
            return cand
    return (repo / ".." / "shared" / "data").resolve()


def _source_key(data_dir: Path, spec: TaskSpec) -> str:
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    for rel in spec.sources:
        st = (data_dir / rel).stat()
        h.update(f"{(data_dir / rel).resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def convert_task_data(name: str, data_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir/<name>-<key>.jsonl`` from the local files (skipped when up to date); return its path."""
    spec = TASKS[name]
    missing = [rel for rel in spec.sources if not (data_dir / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: missing {', '.join(str(data_dir / m) for m in missing)} (see --data-dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}-{_source_key(data_dir, spec)}.jsonl"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in spec.convert(data_dir):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    return out


def task_yaml(name: str, data_file: Path) -> str:
    spec = TASKS[name]
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    {spec.split}: {json.dumps(str(data_file))}\n"
        f"{'validation' if spec.split == 'validation' else 'test'}_split: {spec.split}\n"
        + spec.yaml_body
        + f"metadata:\n  version: 1.0\n  source: ligerfx local copy of {', '.join(spec.sources)}\n"
    )


def prepare_tasks(tasks: Iterable[str], data_dir: Optional[os.PathLike] = None,
                  cache: Optional[os.PathLike] = None) -> Path:
    """Convert the data and write one lm-eval YAML per task; return the folder (``TaskManager(include_path=...)``)."""
    from ..models import cache_dir

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    root = Path(cache) if cache is not None else cache_dir() / "eval"
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    files = {t: convert_task_data(t, data_dir, root / "data") for t in tasks}
    key = hashlib.sha256("|".join(f"{t}={files[t]}" for t in sorted(files)).encode()).hexdigest()[:12]
    ydir = root / "tasks" / key
    ydir.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        (ydir / f"{t}.yaml").write_text(task_yaml(t, files[t]), encoding="utf-8")
    (ydir / "data_files.json").write_text(json.dumps({t: str(f) for t, f in files.items()}, indent=1))
    return ydir
