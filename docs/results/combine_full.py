"""Combine a --subsample 1500 run with the complement shards (complete_subsample.py) into full-set numbers.

Checks that the document sets are disjoint and cover the task exactly. Run from the repository root:
    python docs/results/combine_full.py
"""
import json
import math

from ligerfx.evaluation import harness
from ligerfx.evaluation.tasks import default_data_dir, prepare_tasks

RUNS = [
    ("arc_easy", "teacher-cpu-bf16-arce1500", ["teacher-cpu-bf16-arce-rest/shard0.json"], 2376),
    ("lambada_openai", "teacher-cpu-bf16-lambada1500",
     ["teacher-cpu-bf16-lambada-rest/shard0.json", "teacher-cpu-bf16-lambada-rest/shard1.json"], 5153),
]


def load(p):
    return json.load(open(p))


res = {}
for task, subdir, shards, N in RUNS:
    inc = prepare_tasks([task], default_data_dir())
    docs = set(harness.subsample_indices([task], inc, 1500, 1234)[task])
    parts = [(load(f"docs/results/{subdir}/eval.json")["tasks"][task], 1500)]
    for s in shards:
        d = load("docs/results/" + s)
        parts.append((d["summary"][task], d["n"]))
        assert not (docs & set(d["docs"]))
        docs |= set(d["docs"])
    assert docs == set(range(N)), len(docs)
    out = {"n": N}
    for m in ("acc", "acc_norm"):
        if m in parts[0][0]:
            p = sum(r[m] * n for r, n in parts) / N
            out[m] = p
            out[m + "_stderr"] = 100 * math.sqrt((p / 100) * (1 - p / 100) / (N - 1))
    if "perplexity" in parts[0][0]:
        out["perplexity"] = math.exp(sum(math.log(r["perplexity"]) * n for r, n in parts) / N)
    res[task] = out
print(json.dumps(res, indent=1))
json.dump({"note": "full-set numbers combined from the 1,500-document random subset (seed 1234) and the complement "
           "shards; acc = document-weighted mean, perplexity = exp of the document-weighted mean log-perplexity (= "
           "lm-eval's exp(-mean loglikelihood) over all documents); stderr = sqrt(p(1-p)/(n-1)) like lm-eval's "
           "mean_stderr", "tasks": res}, open("docs/results/teacher-cpu-bf16-full-combined.json", "w"), indent=1)
