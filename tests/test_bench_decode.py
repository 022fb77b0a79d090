"""benchmarks/decode.py smoke mode on CPU: rows, their keys, constant ligerfx cache, growing teacher cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"model", "impl", "context", "batch", "ms_per_token_median", "ms_p90", "tokens_per_s", "peak_mem_bytes",
        "cache_bytes", "card", "dtype", "torch", "transformers", "status"}


def test_decode_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu", "--contexts", "256,512",
           "--steps", "4", "--tiny", "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| context | teacher ms/tok | ligerfx ms/tok |" in res.stdout
    assert res.stderr.count("[decode] llama-tiny ") >= 4  # a progress line per measurement

    rows = json.loads((tmp_path / "decode-cpu-tiny.json").read_text())
    assert (tmp_path / "decode-cpu-tiny.png").stat().st_size > 0
    assert {(r["impl"], r["context"]) for r in rows} == {(i, c) for i in ("teacher", "ligerfx") for c in (256, 512)}
    for r in rows:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert r["status"] == "ok", r
        assert r["model"] == "llama-tiny" and r["batch"] == 1
        assert r["ms_per_token_median"] > 0 and r["ms_p90"] >= r["ms_per_token_median"] and r["tokens_per_s"] > 0
    cache = {(r["impl"], r["context"]): r["cache_bytes"] for r in rows}
    assert cache["ligerfx", 256] == cache["ligerfx", 512] > 0
    assert cache["teacher", 512] > cache["teacher", 256] > 0

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--plot-only",
                          str(tmp_path / "decode-cpu-tiny.json")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 512 |" in res.stdout


def test_decode_benchmark_variant(tmp_path):
    """--variant complementary: its own file, the variant in every row, a constant cache that is larger than
    gla's (the ring also keeps pre-RoPE keys and gate inputs; the state has the normaliser column)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    caches = {}
    for variant in ("gla", "complementary"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu", "--contexts", "256,512",
               "--steps", "2", "--warmup", "1", "--tiny", "--impls", "ligerfx", "--variant", variant,
               "--out-dir", str(tmp_path)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        name = "decode-cpu-tiny.json" if variant == "gla" else f"decode-cpu-tiny-{variant}.json"
        rows = json.loads((tmp_path / name).read_text())
        assert {r["context"] for r in rows} == {256, 512}
        for r in rows:
            assert r["status"] == "ok" and r["impl"] == "ligerfx" and r["variant"] == variant, r
        caches[variant] = {r["context"]: r["cache_bytes"] for r in rows}
        assert caches[variant][256] == caches[variant][512] > 0
    assert caches["complementary"][256] > caches["gla"][256]


def test_decode_ops_counts(tmp_path):
    """benchmarks/decode_ops.py (eager only): the per-layer launch count it reports is the profiler's count."""
    out = tmp_path / "ops.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_ops.py"), "--no-compile", "--variants", "teacher,ligerfx",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    t, l = rows["teacher"], rows["ligerfx"]
    assert t["eager_custom_ops"] == 0 and l["eager_custom_ops"] >= l["layers"]  # a ligerfx op per linearized layer
    assert l["eager_ops_extra_per_layer"] == (l["eager_ops"] - t["eager_ops"]) / l["layers"]
    assert l["eager_host_syncs"] == 0  # a decode step reads nothing back to the host
    assert "| ligerfx |" in res.stdout


def test_eval_forward_smoke(tmp_path):
    """benchmarks/eval_forward.py on CPU: a row per model with cold, warm and warm-with-a-cache passes, the same
    seeded lengths for every model, and bad length bounds refused with the argument named."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "eval_forward.py"), "--model", "llama-tiny", "--device", "cpu",
           "--batches", "3", "--batch", "2", "--min-len", "5", "--max-len", "40", "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| model | cold pass s | warm pass s |" in res.stdout
    out = json.loads((tmp_path / "eval-forward-cpu.json").read_text())
    assert [r["impl"] for r in out["rows"]] == ["teacher", "gla", "swa_sinks", "complementary"]
    assert len(out["lengths"]) == 3 and all(5 <= n <= 40 for n in out["lengths"])
    for r in out["rows"]:
        assert r["cold_s"] > 0 and r["warm_s"] > 0 and r["warm_with_cache_s"] > 0 and r["tokens_per_s_warm"] > 0
    assert out["rows"][0]["warm_over_teacher"] == 1.0
    bad = subprocess.run(cmd[:-2] + ["--min-len", "50"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "--min-len 50" in bad.stderr + bad.stdout
