"""Small helpers shared by the Triton kernel files: interpreter detection and interpreter-safe autotuning."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Launcher:
    """``kernel[grid](**kwargs)`` with launch options from a fixed default or from Triton's autotuner."""

    def __init__(self, fn, configs, key, default, restore=None):
        self.fn = fn
        self.default = default or (lambda kw: configs[0])
        self.restore = tuple(restore or ())
        # restore_value: the tuner times every config on the real arguments; a kernel that updates a buffer in place
        # would see its own output as input from the second run on (a wrong result, silently)
        self.tuner = triton.autotune(configs=configs, key=key, restore_value=list(self.restore) or None)(fn)

    def __getitem__(self, grid):
        def launch(**kwargs):
            if interpreting():
                return self.fn[grid](**kwargs)
            if os.environ.get("LIGERFX_AUTOTUNE", "0") == "1":
                return self.tuner[grid](**kwargs)
            cfg = self.default(kwargs)
            return self.fn[grid](**kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return launch


def autotune(configs, key, default=None, restore=None):
    """Decorator: launch with ``default(kwargs)`` (a ``triton.Config``; first config if None), or autotune over
    ``configs`` keyed on ``key`` when ``LIGERFX_AUTOTUNE=1``.

    ``restore``: names of the arguments the kernel may read after writing (in-place updates): the tuner saves and
    restores them around every timed run, so tuning does not change the result.

    Off by default: the defaults are tiles checked to compile without register spills, and tuning costs every
    config's compile time at the first call of each shape. Under the interpreter no launch option is passed.
    """
    return lambda fn: _Launcher(fn, configs, key, default, restore)


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
