"""Small helpers shared by the Triton kernel files: interpreter detection and interpreter-safe autotuning."""
from __future__ import annotations

import json
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Launcher:
    """``kernel[grid](**kwargs)`` with launch options from, in order: Triton's autotuner (``LIGERFX_AUTOTUNE=1``), a
    tuned table for this card and Triton version (``ligerfx/kernels/tuned/*.json``, written by
    ``benchmarks/tune_kernels.py``), or the kernel file's fixed default."""

    def __init__(self, fn, configs, key, default, restore=None):
        self.fn = fn
        self.name = fn.__name__
        self.key = list(key)
        self.default = default or (lambda kw: configs[0])
        self.restore = tuple(restore or ())
        # restore_value: the tuner times every config on the real arguments; a kernel that updates a buffer in place
        # would see its own output as input from the second run on (a wrong result, silently)
        self.tuner = triton.autotune(configs=configs, key=key, restore_value=list(self.restore) or None)(fn)
        self.picks = {}  # launch key -> (tuner's pick, default) in this process (benchmarks/tune_kernels.py)
        LAUNCHERS[self.name] = self

    def launch_key(self, kwargs) -> tuple:
        """What a launch config depends on: the tuning-key arguments, then the dtypes of the tensor arguments."""
        return tuple(kwargs[k] for k in self.key if k in kwargs) + tuple(
            str(v.dtype).replace("torch.", "") for v in kwargs.values() if isinstance(v, torch.Tensor))

    def config(self, kwargs, table=None):
        """The launch config outside autotuning: the tuned table's entry for this launch key, else the default. The
        key is built only when the table has entries for this kernel (every launch comes through here)."""
        picks = table.get(self.name) if table else None
        hit = picks.get(self.launch_key(kwargs)) if picks else None
        return hit if hit is not None else self.default(kwargs)

    def __getitem__(self, grid):
        def launch(**kwargs):
            if interpreting():
                return self.fn[grid](**kwargs)
            if os.environ.get("LIGERFX_AUTOTUNE", "0") == "1":
                out = self.tuner[grid](**kwargs)
                self.picks[self.launch_key(kwargs)] = (self.tuner.best_config, self.default(kwargs))
                return out
            cfg = self.config(kwargs, tuned_table(_device_of(kwargs)))
            return self.fn[grid](**kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return launch


LAUNCHERS: dict = {}  # kernel name -> _Launcher, every kernel declared with @autotune
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_TABLES: dict = {}


def _device_of(kwargs):
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def load_table(path: str, card: str, triton_version: str):
    """``{kernel: {launch key: triton.Config}}`` from a tuned JSON file, or None when it was tuned on another card
    or Triton version (launch configs are version-sensitive: triton 3.6 miscompiles one kernel at 2 stages)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("card") != card or data.get("triton") != triton_version:
            return None
        return {name: {tuple(e["key"]): triton.Config({}, num_warps=e["num_warps"], num_stages=e["num_stages"])
                       for e in entries} for name, entries in data["kernels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"tuned launch-config table {path} (LIGERFX_TUNED or ligerfx/kernels/tuned/) cannot be "
                         f"used: {type(e).__name__}: {e}; LIGERFX_TUNED=0 ignores tables") from e


def tuned_table(device):
    """The tuned table for ``device`` (cached): ``$LIGERFX_TUNED`` (a file; ``0`` = none) or the first file in
    ``ligerfx/kernels/tuned/`` made on this card with this Triton version; None if there is none."""
    if device is None or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _TABLES:
        env = os.environ.get("LIGERFX_TUNED", "")
        card = torch.cuda.get_device_name(idx)
        paths = [] if env == "0" else [env] if env else sorted(
            os.path.join(TUNED_DIR, n) for n in os.listdir(TUNED_DIR) if n.endswith(".json")) \
            if os.path.isdir(TUNED_DIR) else []
        table = None
        for path in paths:
            table = load_table(path, card, triton.__version__)
            if table is not None:
                break
        _TABLES[idx] = table
    return _TABLES[idx]


def autotune(configs, key, default=None, restore=None):
    """Decorator: launch with ``default(kwargs)`` (a ``triton.Config``; first config if None), or autotune over
    ``configs`` keyed on ``key`` when ``LIGERFX_AUTOTUNE=1``.

    ``restore``: names of the arguments the kernel may read after writing (in-place updates): the tuner saves and
    restores them around every timed run, so tuning does not change the result.

    Off by default: the defaults are tiles checked to compile without register spills, and tuning costs every
    config's compile time at the first call of each shape; ``benchmarks/tune_kernels.py`` stores the tuner's
    picks once per card (see ``_Launcher``). Under the interpreter no launch option is passed.
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
