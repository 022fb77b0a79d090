"""benchmarks/train_step.py smoke mode on CPU: one row per mode, its keys, compiled losses equal eager's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"arch", "mode", "batch", "seq", "ms_median", "ms_p90", "tokens_per_s", "speedup", "compile_s",
        "peak_mem_bytes", "graphs", "graph_breaks", "graph_break_reasons", "losses", "first_loss",
        "loss_rel_diff_vs_eager", "loss_matches_eager", "card", "torch", "transformers", "status"}


@pytest.mark.slow
def test_train_step_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny",
           "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| mode | ms/step (median) |" in res.stdout

    rows = json.loads((tmp_path / "train-step-cpu-tiny.json").read_text())
    assert [r["mode"] for r in rows] == ["eager", "ligerfx", "inductor"]
    for r in rows:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert r["status"] == "ok", r
        assert r["arch"] == "gemma-270m-tiny" and r["batch"] == 2 and r["seq"] == 64
        assert r["ms_median"] > 0 and r["tokens_per_s"] > 0 and len(r["losses"]) == 3  # 1 warm-up + 2 timed
        assert r["loss_matches_eager"] is True and r["loss_rel_diff_vs_eager"] <= 1e-2
    compiled = [r for r in rows if r["mode"] != "eager"]
    for r in compiled:
        assert r["graphs"] >= 1 and r["graph_breaks"] == 0, r["graph_break_reasons"]
        assert r["compile_s"] >= 0
