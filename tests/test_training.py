"""``ligerfx train`` end to end on CPU: a tiny random Llama with an offline word-level tokenizer."""
import contextlib
import json
import lzma
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ligerfx
from ligerfx.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ligerfx.config import LigerConfig
from ligerfx.training import cli
from ligerfx.training.data import (IGNORE_INDEX, ChunkStream, DataError, Record, Source, alpaca_prompt,
                                   parse_count, read_records, tokenize_records)
from ligerfx.training.trainer import micro_step_loss, read_log

RECORDS = [
    {"instruction": "what color is the cat", "input": "", "output": "the cat is red"},
    {"instruction": "what color is the dog", "input": "", "output": "the dog is blue"},
    {"instruction": "name the animal", "input": "a small cat sat on the mat", "output": "cat"},
    {"instruction": "count to three", "input": "", "output": "one two three"},
]


def write_jsonl(path, rows):
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def build_tokenizer(texts):
    words = sorted({w for t in texts for w in t.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A model folder (tiny random Llama + tokenizer) and a repeated 4-record Alpaca file."""
    root = tmp_path_factory.mktemp("train")
    texts = [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in RECORDS]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(root / "alpaca.jsonl.xz", RECORDS * 8)
    return {"root": root, "model": str(model_dir), "data": str(data), "tokenizer": tokenizer}


def train(workdir, out, *extra):
    argv = ["--model", workdir["model"], "--data", workdir["data"], "-o", str(out), "--seq-len", "48",
            "--batch-size", "2", "--micro-batch-size", "1", "--lr", "2e-2", "--warmup-steps", "1",
            "--val-samples", "4", "--eval-every", "3", "--quiet", *extra]
    return cli.main(argv)


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir / "log.csv")]


def test_cli_packing_aligned(workdir, tmp_path, monkeypatch):
    """--packing aligned reaches the data pipeline: every sequence the model trains on starts with BOS (with the
    default concat packing most do not, so the check can fail), and is recorded for --resume."""
    import ligerfx.training.trainer as trainer_mod

    made = []
    real = trainer_mod.Source

    def spy(*a, **k):
        src = real(*a, **k)
        made.append(src)
        return src

    monkeypatch.setattr(trainer_mod, "Source", spy)
    bos = workdir["tokenizer"].bos_token_id
    for packing, all_bos in (("aligned", True), ("concat", False)):
        out = tmp_path / packing
        assert train(workdir, out, "--max-tokens", str(4 * 2 * 48), "--packing", packing) == 0
        src = made[-1]
        firsts = [int(src.chunk(i)[0][0]) == bos for i in range(4 * 2)]
        assert all(firsts) if all_bos else not all(firsts)
        assert json.loads((out / "training_args.json").read_text())["args"]["packing"] == packing


def test_loss_decreases_and_run_folder(workdir, tmp_path):
    out = tmp_path / "run"
    assert train(workdir, out, "--max-tokens", str(10 * 2 * 48), "--lr", "5e-2") == 0
    curve = losses(out)
    assert len(curve) == 10
    assert np.mean(curve[-3:]) < 0.8 * curve[0], curve
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "training_args.json", "log.csv", "summary.json",
                 "ligerfx_config.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "training_args.json").read_text())
    assert meta["derived"]["total_steps"] == 10 and meta["liger_config"]["lora"]["r"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["val_loss"] is not None


def test_resume_reproduces_uninterrupted_run(workdir, tmp_path):
    budget = str(6 * 2 * 48)
    full, split = tmp_path / "full", tmp_path / "split"
    assert train(workdir, full, "--max-tokens", budget, "--lora-dropout", "0.1", "--save-every", "4") == 0
    assert train(workdir, split, "--max-tokens", budget, "--lora-dropout", "0.1", "--save-every", "4",
                 "--max-steps", "2") == 0
    assert (split / "checkpoint-0000002").is_dir() and not (split / ADAPTER_WEIGHTS).exists()
    assert len(losses(split)) == 2
    with pytest.raises(FileExistsError):
        train(workdir, split, "--max-tokens", budget, "--lora-dropout", "0.1", "--save-every", "4")
    with pytest.raises(ValueError, match="lr"):
        train(workdir, split, "--max-tokens", budget, "--lora-dropout", "0.1", "--resume", "--lr", "1e-3")
    assert train(workdir, split, "--max-tokens", budget, "--lora-dropout", "0.1", "--save-every", "4",
                 "--resume") == 0

    a, b = read_log(full / "log.csv"), read_log(split / "log.csv")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
        assert (ra["val_loss"] is None) == (rb["val_loss"] is None)
        if ra["val_loss"] is not None:
            assert abs(ra["val_loss"] - rb["val_loss"]) <= 1e-6
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / ADAPTER_WEIGHTS)), load_file(str(split / ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIGERFX_TEST_DDP"), reason="set LIGERFX_TEST_DDP=1 (starts 2 torchrun workers)")
def test_ddp_two_ranks_match_one_process(workdir, tmp_path):
    args = ["--max-tokens", str(4 * 2 * 48), "--save-every", "2"]
    assert train(workdir, tmp_path / "one", *args) == 0
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ligerfx.cli", "train",
            "--model", workdir["model"], "--data", workdir["data"], "-o", str(tmp_path / "two"), "--seq-len", "48",
            "--batch-size", "2", "--lr", "2e-2", "--warmup-steps", "1", "--val-samples", "4", "--eval-every", "3",
            "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(argv, check=True, env=env, timeout=300)
    a, b = read_log(tmp_path / "one" / "log.csv"), read_log(tmp_path / "two" / "log.csv")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
    assert (tmp_path / "two" / "checkpoint-0000004" / "rng_rank1.pt").is_file()


def test_distill_and_mix_data(workdir, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sat on the mat"}] * 20)
    out = tmp_path / "run"
    assert train(workdir, out, "--max-tokens", str(2 * 2 * 48), "--distill", "--distill-weight", "0.5",
                 "--mix-data", f"{text}:0.5", "--sinks", "2") == 0
    rows = read_log(out / "log.csv")
    assert len(rows) == 2
    assert json.loads((out / "ligerfx_config.json").read_text())["sinks"] == 2  # what `ligerfx eval --adapter` reads
    for r in rows:
        assert r["kl"] is not None and r["kl"] >= 0
        assert r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kl"], rel=1e-6)


def test_malformed_line_names_file_and_line(workdir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], RECORDS[1], '{"instruction": "x", "output": 3}'])
    out = tmp_path / "run"
    assert train(workdir, out, "--data", str(bad), "--max-tokens", "96") == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: field 'output' must be a string" in err
    assert not (out / "log.csv").exists()  # failed before training started


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ('["instruction"]', "expected a JSON object"),
    ('{"instruction": "x"}', "field 'output' missing"),
    ('{"instruction": " ", "output": "y"}', "field 'instruction' is empty"),
    ('{"question": "x"}', "unknown record type"),
])
def test_read_records_errors(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl.xz", [RECORDS[0], "", line] if "question" not in line else [line])
    lineno = 3 if "question" not in line else 1
    with pytest.raises(DataError, match=re.escape(f"d.jsonl.xz:{lineno}: {message}")):
        read_records(path)


def test_mix_data_schema_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match="t.jsonl:2: field 'text' missing"):
        read_records(path)


def test_samples_labels_and_packing(workdir, tmp_path):
    tok = workdir["tokenizer"]
    schema, records = read_records(workdir["data"])
    assert schema == "alpaca" and len(records) == 32
    assert records[2].prompt.endswith("### Input:\na small cat sat on the mat\n\n### Response:\n")
    ids, labels = tokenize_records(records[:1], tok)[0]
    response = tok("the cat is red", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    n_resp = len(response) + 1
    assert list(ids[-n_resp:-1]) == response
    assert (labels[:-n_resp] == IGNORE_INDEX).all() and list(labels[-n_resp:]) == list(ids[-n_resp:])

    # T0-style completion: the <|endoftext|> marker is dropped, the tokenizer's EOS appended instead
    t0 = write_jsonl(tmp_path / "t0.jsonl", [{"template": "x", "prompt": "count to", "completion": "three<|endoftext|>"}])
    schema, (rec,) = read_records(t0)
    assert schema == "prompt_completion" and rec == Record("count to", "three")
    ids, labels = tokenize_records([rec], tok)[0]
    assert len(ids) == 5 and list(labels) == [IGNORE_INDEX] * 3 + list(ids[3:])

    samples = tokenize_records(records, tok)
    src = Source("d", samples, seq_len=16, seed=0)
    assert src.chunks_per_epoch == sum(len(s[0]) for s in samples) // 16
    a0, a1 = src.chunk(0), src.chunk(src.chunks_per_epoch)  # epoch 0 and epoch 1 are shuffled differently
    assert a0[0].shape == (16,) and not np.array_equal(a0[0], a1[0])
    assert np.array_equal(Source("d", samples, 16, 0).chunk(5)[0], src.chunk(5)[0])  # deterministic


def test_aligned_packing():
    """Every chunk starts where a sample (or a seq_len piece of a long one) starts, samples follow each other whole
    and in the epoch's order, only the one that overflows a chunk is cut; epochs chain on in the global index."""
    rng = np.random.default_rng(1)
    L = 16
    lens = rng.integers(1, 41, size=60)
    samples = [(np.arange(n, dtype=np.int32) + 1000 * i, np.arange(n, dtype=np.int32) + 1000 * i) for i, n in
               enumerate(lens)]
    src = Source("d", samples, L, seed=3, packing="aligned")
    concat = Source("d", samples, L, seed=3)
    with pytest.raises(ValueError, match="packing"):
        Source("d", samples, L, 0, packing="docs")

    def epoch_chunks(start, count):
        return [src.chunk(start + k) for k in range(count)]

    n0 = src.chunks_per_epoch
    first = epoch_chunks(0, n0)
    order = list(np.random.default_rng([3, 0]).permutation(len(samples)))
    seen = []  # (sample, first position) runs in stream order
    for ids, labels in first:
        assert ids.shape == (L,) and np.array_equal(ids, labels)
        sid, pos = ids // 1000, ids % 1000
        assert pos[0] % L == 0  # a sample start, or a seq_len boundary inside a long sample
        runs = np.flatnonzero(np.diff(sid)) + 1
        for r in runs:
            assert pos[r] == 0  # a later sample in the chunk starts at its beginning
        for a, b in zip(np.r_[0, runs], np.r_[runs, L]):
            assert np.array_equal(pos[a:b], np.arange(pos[a], pos[a] + b - a))  # contiguous
            seen.append((int(sid[a]), int(pos[a]), int(b - a)))
    # in order, and a sample is only cut at a chunk's end
    ids_in_order = [s for s, _, _ in seen]
    dedup = [s for k, s in enumerate(ids_in_order) if k == 0 or s != ids_in_order[k - 1]]
    assert dedup == order[:len(dedup)]
    # tokens: nothing duplicated, and far more kept than an aligned packer that pads would keep
    assert n0 * L == sum(n for _, _, n in seen)
    assert n0 <= concat.chunks_per_epoch
    # epoch 1 follows epoch 0 in the global index, in a new order
    e1 = src.chunk(n0)
    assert e1[0][0] % 1000 == 0 and not np.array_equal(e1[0], first[0][0])
    # seekable and deterministic: a fresh source gives the same chunk far into the stream
    assert np.array_equal(Source("d", samples, L, 3, packing="aligned").chunk(5 * n0 + 2)[0], src.chunk(5 * n0 + 2)[0])
    assert np.array_equal(src.chunk(3)[0], first[3][0])  # going back re-packs epoch 0 identically


def test_chunk_stream_mix():
    def src(name, token):
        return Source(name, [(np.full(10, token, np.int32), np.full(10, token, np.int32))] * 10, 5, 0)

    stream = ChunkStream([src("a", 1), src("b", 2)], [0.75, 0.25], total_chunks=4000, seed=0)
    share = float(np.mean([stream.get(i)[0][0] == 2 for i in range(4000)]))
    assert 0.22 < share < 0.28
    assert stream.epochs(4000) == pytest.approx((stream.source_of == 0).sum() / 20)


def test_epoch_budget():
    from types import SimpleNamespace

    from ligerfx.training.trainer import schedule_steps

    src = Source("a", [(np.zeros(10, np.int32), np.zeros(10, np.int32))] * 100, 10, 0)  # 100 chunks per epoch
    args = SimpleNamespace(batch_size=4, seq_len=10, epochs=2.0, max_tokens="20M")
    assert schedule_steps(args, [src], [1.0]) == 50
    assert schedule_steps(args, [src, src], [0.5, 0.5]) == 100  # half the chunks come from the other corpus
    args.epochs = None
    assert schedule_steps(args, [src], [1.0]) == 20_000_000 // 40


def test_parse_count():
    assert parse_count("20M") == 20_000_000
    assert parse_count("500k") == 500_000
    assert parse_count("1.5M") == 1_500_000
    assert parse_count("4096") == 4096
    with pytest.raises(ValueError):
        parse_count("lots")


def test_blockwise_distill_kl_equals_one_block(monkeypatch):
    """The checkpointed block-wise KL gives the same value and gradient as one block (and as a float64 formula)."""
    from ligerfx.training import trainer

    torch.manual_seed(0)
    t = torch.randn(50, 33) * 3
    s0 = torch.randn(50, 33, requires_grad=True)
    ref64 = (F.softmax(t.double() / 2, -1) * (F.log_softmax(t.double() / 2, -1)
                                              - F.log_softmax(s0.double() / 2, -1))).sum() * 4
    g64, = torch.autograd.grad(ref64, s0)
    out = {}
    for rows in (1000, 7):
        monkeypatch.setattr(trainer, "KL_ROWS", rows)
        s = s0.detach().clone().requires_grad_(True)
        kl = trainer.distill_kl(t, s, 2.0)
        kl.backward()
        out[rows] = (kl.item(), s.grad)
        assert abs(kl.item() - ref64.item()) <= 1e-5 * abs(ref64.item())
        assert torch.allclose(s.grad.double(), g64.double(), atol=1e-6)
    assert torch.allclose(out[1000][1], out[7][1], atol=1e-6)


def test_time_limit_stops_on_a_resumable_checkpoint(workdir, tmp_path):
    """--time-limit stops before a step would cross it (here: right after the first step, whose duration is the
    first estimate), on a checkpoint that --resume continues to the same curve as an uninterrupted run."""
    budget = str(5 * 2 * 48)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train(workdir, full, "--max-tokens", budget) == 0
    assert train(workdir, cut, "--max-tokens", budget, "--time-limit", "0.001") == 0
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["steps"] == 1 and not summary["finished"] and summary["stopped"].startswith("time limit")
    ckpt = cut / "checkpoint-0000001"
    assert json.loads((ckpt / "ligerfx_config.json").read_text())["window"] == 64  # eval --adapter <ckpt> works
    assert not (cut / ADAPTER_WEIGHTS).exists()
    assert train(workdir, cut, "--max-tokens", budget, "--resume") == 0
    a, b = losses(full), losses(cut)
    assert len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


@pytest.mark.parametrize("text,seconds", [("540", 540), ("9m", 540), ("1.5h", 5400), ("20s", 20)])
def test_parse_duration(text, seconds):
    assert cli.parse_duration(text) == seconds


def test_parse_duration_rejects():
    import argparse

    for bad in ("soon", "-5", "0", "5d"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_duration(bad)


def test_sigterm_stops_after_the_step_with_a_checkpoint(workdir, tmp_path):
    """SIGTERM (what schedulers and `timeout` send) mid-run: the current step finishes, a checkpoint of exactly the
    logged steps is written, the exit code is 128 + 15."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ligerfx.training.cli", "--model", workdir["model"], "--data", workdir["data"],
           "-o", str(out), "--seq-len", "48", "--batch-size", "2", "--micro-batch-size", "1", "--lr", "1e-3",
           "--max-tokens", str(100000 * 2 * 48), "--save-every", "0", "--val-samples", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = len(read_log(log))
    assert summary["stopped"] == "signal SIGTERM" and summary["steps"] == steps >= 3
    assert (out / f"checkpoint-{steps:07d}" / ADAPTER_WEIGHTS).is_file()


def test_compile_matches_eager(workdir, tmp_path):
    """``--compile`` (student and teacher forward through torch.compile with the ligerfx backend) trains the same
    curve as eager: same loss, CE and KL per step (fp32 on CPU; Inductor reorders float sums, hence 1e-4)."""
    budget = ("--max-tokens", str(3 * 2 * 48), "--distill", "--distill-weight", "0.5")
    assert train(workdir, tmp_path / "eager", *budget) == 0
    torch._dynamo.reset()
    assert train(workdir, tmp_path / "compiled", *budget, "--compile") == 0
    eager, compiled = read_log(tmp_path / "eager" / "log.csv"), read_log(tmp_path / "compiled" / "log.csv")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert json.loads((tmp_path / "compiled" / "training_args.json").read_text())["args"]["compile"] is True


# --------------------------------------------------------------------------------------------- attention transfer
def _transfer_inputs(workdir, config, passes=("linearize",)):
    model = LlamaForCausalLM.from_pretrained(workdir["model"]).eval()
    ligerfx.transform(model, passes=list(passes), config=config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a prompt part without loss, as in Alpaca records
    return model, ids, labels


def _reference_transfer(model, ids, labels):
    """float64, with the test's own hooks on ``model.model.layers[i].self_attn``: sum over target tokens of the mean
    over layers of ||s - t||^2 / mean ||t||^2, where token p is a target if labels[p + 1] is not ignored."""
    def run(teacher):
        outs = []
        hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0].double()))
                 for layer in model.model.layers]
        with torch.no_grad(), (ligerfx.teacher_mode(model) if teacher else contextlib.nullcontext()):
            model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        return outs

    t_outs, s_outs = run(True), run(False)
    target = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position p predicts labels[p + 1]
    total = 0.0
    for t, s in zip(t_outs, s_outs):
        t, s = t[:, :-1][target], s[:, :-1][target]
        total += ((s - t) ** 2).sum() / (t ** 2).sum(-1).mean()
    return float(total / len(t_outs))




def _step_terms(model, ids, labels):
    return micro_step_loss(model, model, ids, labels, keep_arg=True, distill=True, temperature=1.0,
                           device=torch.device("cpu"), precision="fp32", attn_transfer=True)


def test_attention_transfer_against_float64_reference(workdir):
    """The logged/optimized transfer term equals an independent float64 computation (different hooks, different
    target selection code), and it is > 0 for real Liger attention."""
    model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=4, mix=0.5))
    ce, kl, at = _step_terms(model, ids, labels)
    ref = _reference_transfer(model, ids, labels)
    assert ref > 1e-3
    assert float(at.detach()) == pytest.approx(ref, rel=1e-4)
    assert at.requires_grad  # it trains the student


def test_attention_transfer_of_a_micro_batch_without_targets_is_zero(workdir):
    model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=4, mix=0.5))
    _, _, at = _step_terms(model, ids, torch.full_like(labels, -100))
    assert float(at.detach()) == 0.0 and at.requires_grad  # not NaN: training goes on, DDP still gets gradients


def test_attention_transfer_is_zero_when_the_student_is_the_teacher(workdir):
    """A window branch that sees every token (window >= T) with mix 0 is exact softmax attention: no transfer error
    and no KL. Fails if the teacher pass records the wrong modules, or the student's outputs in its place."""
    model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=64, mix=0.0))
    ce, kl, at = _step_terms(model, ids, labels)
    n = int((labels[:, 1:] != -100).sum())
    assert float(at.detach()) / n < 1e-9 and float(kl) / n < 1e-6


def test_attention_transfer_gradient_lowers_it_on_a_fixed_batch(workdir):
    """Descending the transfer term alone (LoRA on the attention projections) brings the student's attention
    outputs towards the teacher's: its gradient reaches the LoRA weights through the recorded outputs."""
    model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=4, mix=0.5), passes=("linearize", "lora"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.numel() < 10_000 for p in params)  # LoRA only
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(40):
        _, _, at = _step_terms(model, ids, labels)
        first = float(at.detach()) if first is None else first
        opt.zero_grad()
        at.backward()
        opt.step()
    assert float(_step_terms(model, ids, labels)[2]) < 0.5 * first


def test_attn_transfer_training_logs_the_weighted_terms(workdir, tmp_path):
    out = tmp_path / "run"
    assert train(workdir, out, "--max-tokens", str(12 * 2 * 48), "--distill", "--distill-weight", "0.5",
                 "--attn-transfer", "2", "--ce-weight", "0.25", "--lr", "3e-2", "--window", "4") == 0
    rows = read_log(out / "log.csv")
    assert len(rows) == 12
    for r in rows:
        assert r["at"] is not None and r["at"] > 0
        assert r["loss"] == pytest.approx(0.25 * r["ce"] + 0.5 * r["kl"] + 2 * r["at"], rel=1e-6)
    args = json.loads((out / "training_args.json").read_text())["args"]
    assert args["attn_transfer"] == 2 and args["ce_weight"] == 0.25


@pytest.mark.parametrize("extra, message", [
    (["--attn-transfer", "1"], "add --distill"),
    (["--attn-transfer", "1", "--distill", "--compile"], "--compile"),
    (["--ce-weight", "0"], "leaves no loss"),
    (["--attn-transfer", "-1", "--distill"], ">= 0"),
])
def test_loss_weight_errors(workdir, tmp_path, capsys, extra, message):
    assert train(workdir, tmp_path / "run", "--max-tokens", "96", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_attention_transfer_gradient_under_gradient_checkpointing(workdir):
    """With --grad-checkpointing (non-reentrant) the recorded outputs still carry the graph: the transfer term's
    gradient on the LoRA weights equals the one without checkpointing."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=4, mix=0.5), passes=("linearize", "lora"))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)  # LoRA B starts at 0: give every LoRA weight a gradient
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _, _, at = _step_terms(model, ids, labels)
        at.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_micro_step_loss_refuses_attn_transfer_without_the_teacher_forward(workdir):
    model, ids, labels = _transfer_inputs(workdir, LigerConfig(window=4, mix=0.5))
    with pytest.raises(ValueError, match="distill"):
        micro_step_loss(model, model, ids, labels, keep_arg=True, distill=False, temperature=1.0,
                        device=torch.device("cpu"), precision="fp32", attn_transfer=True)
