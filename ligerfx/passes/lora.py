"""The ``lora`` pass: LoRA adapters on the attention projections the linearize analysis found.

Liger adds no parameters; quality is recovered by LoRA on the pretrained projections (r=8, alpha=8 on q, k, v in the
paper, liger-method.md §4). The pass asks :func:`ligerfx.sites` which ``nn.Linear`` produces each role of every
attention site and injects peft LoRA layers there, in place, with ``peft.inject_adapter_in_model`` (no ``PeftModel``
wrapper, so HF ``generate``, ``save_pretrained`` and the Liger attention classes keep working).

* ``config.lora`` (dict, optional): ``{"targets": ["q", "k", "v"], "r": 8, "alpha": 8, "dropout": 0.0}`` are the
  defaults; ``"o"`` may be added to ``targets``.
* A fused qkv projection (q, k and v mapped to one Linear) is wrapped once; targeting any of q/k/v adapts all three.
* ``target_modules`` in the peft config are the exact module paths, so the adapter reloads with
  ``peft.PeftModel.from_pretrained`` onto a model transformed the same way.
* Afterwards only LoRA parameters require grad.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch.nn as nn

ROLES = ("q", "k", "v", "o")
DEFAULTS: dict[str, Any] = {"targets": ("q", "k", "v"), "r": 8, "alpha": 8, "dropout": 0.0}

__all__ = ["lora_pass", "lora_options", "lora_target_paths", "lora_config", "ROLES", "DEFAULTS"]


def lora_options(lora: Optional[dict]) -> dict[str, Any]:
    """``config.lora`` merged over :data:`DEFAULTS`, validated. ``targets`` comes back as a tuple of roles."""
    opts = dict(DEFAULTS)
    if lora:
        unknown = set(lora) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"LigerConfig.lora has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        opts.update(lora)
    targets = opts["targets"]
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    targets = tuple(dict.fromkeys(str(t).lower() for t in targets))
    bad = [t for t in targets if t not in ROLES]
    if bad or not targets:
        raise ValueError(f"LigerConfig.lora targets {list(targets)}: each must be one of {list(ROLES)}, at least one")
    opts["targets"] = targets
    if int(opts["r"]) <= 0:
        raise ValueError(f"LigerConfig.lora r={opts['r']}: must be > 0")
    if not 0.0 <= float(opts["dropout"]) < 1.0:
        raise ValueError(f"LigerConfig.lora dropout={opts['dropout']}: must lie in [0, 1)")
    opts["r"], opts["alpha"], opts["dropout"] = int(opts["r"]), float(opts["alpha"]), float(opts["dropout"])
    return opts


def lora_target_paths(sites: Iterable, targets: Iterable[str]) -> list[str]:
    """Module paths of the projections playing ``targets`` in ``sites``, in site order, each path once."""
    paths: dict[str, None] = {}
    for site in sites:
        for role in targets:
            path = site.projections.get(role)
            if not path:
                raise ValueError(f"attention site {site.path} has no {role!r} projection (has {sorted(site.projections)})")
            paths[path] = None
    return list(paths)


def lora_config(paths: list[str], opts: dict[str, Any]):
    """The ``peft.LoraConfig`` for exact module ``paths``."""
    from peft import LoraConfig

    alpha = opts["alpha"]
    return LoraConfig(
        r=opts["r"],
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=opts["dropout"],
        target_modules=list(paths),
        bias="none",
    )


def _api(pkg, name: str):
    """``ligerfx.<name>``, or ``ligerfx.api.<name>`` while the package does not re-export it yet."""
    fn = getattr(pkg, name, None)
    if fn is None:
        import importlib

        fn = getattr(importlib.import_module("ligerfx.api"), name)
    return fn


def lora_pass(model: nn.Module, config) -> int:
    """Inject LoRA into the attention projections of ``model`` in place; return the number of wrapped modules.

    ``config`` is the :class:`ligerfx.LigerConfig` of the transform; its ``lora`` dict selects roles and rank.
    Raises ``ValueError`` if the model has no attention sites, a role is missing, or LoRA is already injected.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    import ligerfx

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("model already has LoRA layers; load or merge them instead of running the lora pass again")
    opts = lora_options(getattr(config, "lora", None))
    found = _api(ligerfx, "sites")(model)
    if not found:
        raise ValueError(f"{type(model).__name__}: ligerfx.sites found no attention sites to put LoRA on")
    paths = lora_target_paths(found, opts["targets"])
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path} is a {type(layer).__name__}, not nn.Linear; LoRA needs a Linear projection")

    inject_adapter_in_model(lora_config(paths, opts), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return sum(isinstance(m, LoraLayer) for m in model.modules())
