"""Everything in tests/gpu runs compiled Triton kernels on a CUDA device: skipped on CPU and under the interpreter.

    TRITON_INTERPRET=0 python -m pytest -n 8 -v tests/gpu
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    WHY_SKIP = "needs a CUDA device"
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    WHY_SKIP = "run with TRITON_INTERPRET=0"
else:
    WHY_SKIP = None


@pytest.fixture(autouse=True)
def _gpu_only():
    if WHY_SKIP:
        pytest.skip(WHY_SKIP)
