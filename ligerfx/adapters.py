"""LoRA adapters in peft's file format, without a ``PeftModel`` wrapper.

A directory written by :func:`save_adapter` holds exactly what ``PeftModel.save_pretrained`` writes:

* ``adapter_config.json``: the ``peft.LoraConfig`` (``target_modules`` = exact module paths);
* ``adapter_model.safetensors``: ``get_peft_model_state_dict(model)`` with keys prefixed ``base_model.model.``,
  metadata ``{"format": "pt"}``.

So ``peft.PeftModel.from_pretrained(model, dir)`` loads it onto a model transformed the same way, and
:func:`load_adapter` loads it onto a plain (transformed) model, injecting LoRA layers first if needed.
transformers' own ``model.add_adapter`` refuses peft < 0.22, so only peft's functions are used here.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

import torch
import torch.nn as nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
ADAPTER_NAME = "default"

__all__ = ["save_adapter", "load_adapter", "merge_lora", "lora_layers", "has_lora", "lora_disabled",
           "adapter_state_dict", "unwrap", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: peft LoraLayer}`` of ``model``."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def _peft_config(model: nn.Module):
    cfgs = getattr(unwrap(model), "peft_config", None)
    if not cfgs or ADAPTER_NAME not in cfgs:
        raise ValueError("model has no LoRA adapter (run the 'lora' pass or load_adapter first)")
    return cfgs[ADAPTER_NAME]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed as peft's ``get_peft_model_state_dict`` keys them (no adapter name, no prefix)."""
    from peft import get_peft_model_state_dict

    model = unwrap(model)
    _peft_config(model)
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def _replace_atomically(src: Path, dst: Path) -> None:
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the LoRA adapter of ``model`` to ``directory`` in peft format. Each file is replaced atomically."""
    from safetensors.torch import save_file

    model = unwrap(model)
    config = _peft_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}

    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    saved = config.base_model_name_or_path, config.inference_mode, config.target_modules
    with tempfile.TemporaryDirectory(dir=directory, prefix=".adapter-tmp-") as tmp:
        tmp = Path(tmp)
        try:
            if name_or_path and not saved[0]:
                config.base_model_name_or_path = str(name_or_path)
            config.inference_mode = True
            if isinstance(config.target_modules, (set, frozenset)):
                config.target_modules = sorted(config.target_modules)  # same bytes on every save
            config.save_pretrained(str(tmp))
        finally:
            config.base_model_name_or_path, config.inference_mode, config.target_modules = saved
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            _replace_atomically(tmp / fname, directory / fname)
    return directory


def _read_adapter(directory: Path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; not a peft adapter directory")
    peft_type = json.loads(cfg_path.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {peft_type!r}, only LORA adapters are supported")
    config = LoraConfig.from_pretrained(str(directory))
    tensors = load_file(str(w_path))
    state = {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in tensors.items()}
    return config, state


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], trainable: bool = False) -> nn.Module:
    """Load a peft LoRA adapter from ``directory`` into ``model`` in place and return it.

    LoRA layers are injected first when the model has none (the adapter's ``target_modules`` must exist in the
    model); otherwise the adapter is loaded into the existing layers. Every LoRA tensor of the model must be in the
    file and every tensor of the file must find a place, else ``ValueError``. ``trainable``: LoRA parameters
    require grad afterwards, else they are frozen. Injection freezes the base parameters (peft's rule).
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    directory = Path(directory)
    target = unwrap(model)
    config, state = _read_adapter(directory)
    if not has_lora(target):
        config.inference_mode = False
        inject_adapter_in_model(config, target, adapter_name=ADAPTER_NAME)
    expected = set(adapter_state_dict(target))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter does not fit the model: {len(missing)} LoRA tensors missing "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    result = set_peft_model_state_dict(target, state, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory}: peft could not place {result.unexpected_keys[:3]}...")
    for name, p in target.named_parameters():
        if "lora_" in name:
            p.requires_grad_(trainable)
    return model


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA delta into its base weight and put the plain base layer back; return how many were merged.

    Afterwards the model has no LoRA layers and no ``peft_config``; outputs are unchanged up to rounding
    (the base weight's dtype).
    """
    target = unwrap(model)
    layers = lora_layers(target)
    for path, layer in layers.items():
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        parent_path, _, child = path.rpartition(".")
        parent = target.get_submodule(parent_path) if parent_path else target
        setattr(parent, child, base)
    if hasattr(target, "peft_config"):
        del target.peft_config
    return len(layers)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base weights (every LoRA layer bypassed); restores adapters and ``requires_grad``."""
    layers = list(lora_layers(model).values())
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    states = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, was_disabled in zip(layers, states):
            m.enable_adapters(not was_disabled)
        for p, flag in flags:
            p.requires_grad_(flag)
