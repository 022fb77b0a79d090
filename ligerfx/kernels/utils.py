"""Small helpers shared by the Triton kernel files: interpreter detection and interpreter-safe autotuning."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key):
    """``triton.autotune`` that keeps only the first config under the interpreter (it cannot benchmark there)."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key)


def warps_stages(warps=(4, 8), stages=(1, 2, 3)):
    """Configs over ``num_warps`` x ``num_stages`` only; block sizes are picked by the host wrappers."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 inputs (tests compare at 1e-4), tf32 otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def common_dtype(*xs: torch.Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt
