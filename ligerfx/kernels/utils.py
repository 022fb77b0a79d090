"""Small helpers shared by the Triton kernel files: interpreter detection and interpreter-safe autotuning."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key, default=None):
    """``triton.autotune`` over ``configs``, with two ways out of benchmarking.

    Under the interpreter only the first config is kept (the interpreter cannot benchmark). With
    ``LIGERFX_AUTOTUNE=0`` no config is benchmarked either: ``default(kwargs)`` (or the first config) is used, which
    saves the compile time of the other configs (GPU tests, quick benchmarks).
    """
    if interpreting():
        return triton.autotune(configs=configs[:1], key=key)

    def prune(configs, named_args, **kwargs):
        if os.environ.get("LIGERFX_AUTOTUNE", "1") == "0":
            return [default({**named_args, **kwargs}) if default is not None else configs[0]]
        return configs

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


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
