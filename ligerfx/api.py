"""Public API: ``transform``, ``from_pretrained``, ``sites``, ``teacher_mode``."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .config import LigerConfig
from .passes.capture import at_position, find_attention
from .passes.linearize import LinearizedAttention, linearize_module
from .passes.patterns import UnsupportedAttentionError

log = logging.getLogger("ligerfx")
PASSES = ("linearize", "lora")
VERSION = "0.1.0"


@dataclass(frozen=True)
class AttentionSite:
    """A linearized attention: module path, decoder-layer index and the projections the pass identified
    (role ``"q" | "k" | "v" | "o"`` -> full module path; a fused qkv projection appears under several roles)."""
    path: str
    layer_idx: int
    kind: str
    projections: dict


def _lora_pass(model, config):
    from .passes.lora import lora_pass
    return lora_pass(model, config)


def transform(model: torch.nn.Module, passes: Iterable[str] = ("linearize",), config: Optional[LigerConfig] = None):
    """Linearize ``model`` in place and return it.

    Args:
        model: a Hugging Face causal LM (any architecture whose attention reaches softmax attention).
        passes: ``"linearize"`` (softmax attention -> Liger attention) and optionally ``"lora"``.
        config: a ``LigerConfig``; stored in ``model.config.ligerfx``.
    """
    passes = list(passes)
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known passes: {list(PASSES)}")
    if not passes:
        raise ValueError(f"passes is empty; known passes: {list(PASSES)}")
    config = config or LigerConfig()
    if not isinstance(config, LigerConfig):
        raise TypeError(f"config must be a ligerfx.LigerConfig, got {type(config).__name__}")
    report = {}
    if "linearize" in passes:
        if getattr(model, "_ligerfx_sites", None):
            raise ValueError("model is already linearized by ligerfx")
        if config.n_sinks > 0 and config.sink_position is None:  # resolve "auto" once, store it resolved
            resolved = config.resolve_sink_position(getattr(model, "config", None))
            config = dataclasses.replace(config, sink_position="absolute" if resolved is None else resolved)
        report["linearize"] = _linearize(model, config)
    elif not getattr(model, "_ligerfx_sites", None):
        raise ValueError("the 'lora' pass targets the projections found by 'linearize': run passes=['linearize', "
                         "'lora'] (or transform a linearized model)")
    if "lora" in passes:
        report["lora"] = _lora_pass(model, config)
    prev = getattr(model.config, "ligerfx", None) or {}
    done = list(dict.fromkeys(list(prev.get("passes", [])) + passes))
    model.config.ligerfx = {**config.to_dict(), "passes": done, "version": VERSION}
    model._ligerfx_report = report
    log.info("ligerfx: %s", report)
    return model


def _linearize(model, config: LigerConfig) -> int:
    found = find_attention(model)
    if not found:
        raise UnsupportedAttentionError(f"{type(model).__name__}: no softmax attention module found "
                                        "(is this a Transformer causal LM?)")
    layer_types = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "layer_types", None)
    P = config.resolve_sink_position(getattr(model, "config", None))
    at_p = {}
    if P is not None:  # every attention input as it is at position P (cos/sin rows): the sinks' query position
        at_p = at_position(model, P)
    sites = []
    for order, (path, module, kind, call) in enumerate(found):
        idx = getattr(module, "layer_idx", None)
        idx = order if idx is None else int(idx)
        if config.layers is not None and idx not in config.layers:
            continue
        if config.only_full_attention:
            sliding = (layer_types[idx] == "sliding_attention") if layer_types else \
                bool(getattr(module, "sliding_window", None))
            if sliding:
                continue
        if P is not None and id(module) not in at_p:
            raise UnsupportedAttentionError(f"{path}: no call recorded at the sink position {P} (the one-token probe "
                                            "did not reach this attention); use sink_position='absolute'")
        try:
            sink = None if P is None else (P, at_p[id(module)])
            lin = linearize_module(module, path, idx, call, config, sink=sink)
        except UnsupportedAttentionError as e:
            msg = str(e)
            raise UnsupportedAttentionError(msg if msg.startswith(path) else f"{path}: {msg}") from None
        prefix = path + "." if path else ""
        projections = {r: (prefix + p if p else "") for r, p in lin.info.projections.items()}
        sites.append(AttentionSite(path, idx, lin.info.kind, projections))
    if config.layers is not None:
        missing = sorted(set(config.layers) - {s.layer_idx for s in sites})
        if missing:
            raise ValueError(f"LigerConfig.layers names layer(s) {missing}, which have no attention; "
                             f"attention layers: {[getattr(m, 'layer_idx', i) for i, (_, m, _, _) in enumerate(found)]}")
    model._ligerfx_sites = sites
    for p in model.parameters():
        _TRANSFORMED_PARAMS[id(p)] = p
    _guard_generate(model)
    return len(sites)


def sites(model) -> list[AttentionSite]:
    """The attention sites ``transform`` linearized (empty for an untransformed model)."""
    return list(getattr(model, "_ligerfx_sites", []))


def _modules(model) -> list[LinearizedAttention]:
    return [m._ligerfx for m in model.modules() if isinstance(getattr(m, "_ligerfx", None), LinearizedAttention)]


# every parameter of a transformed model (id -> tensor, weak): a Dynamo graph that takes one of them as input comes
# from a transformed model, which the ligerfx backend must never linearize (its softmax attention, if any, is meant)
_TRANSFORMED_PARAMS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def is_transformed_param(t) -> bool:
    """True for a parameter of a model ``transform`` linearized (identity, not value)."""
    return _TRANSFORMED_PARAMS.get(id(t)) is t


@contextlib.contextmanager
def teacher_mode(model):
    """Run the original softmax attention inside this block (same weights; e.g. for self-distillation).

    Works under ``torch.compile(..., backend="ligerfx")`` too: the backend never linearizes a transformed model's
    graph (see ``is_transformed_param``), and Dynamo guards on the mode, so the student's graph is never reused for
    the teacher."""
    mods = _modules(model)
    prev = [m.teacher for m in mods]
    try:
        for m in mods:
            m.teacher = True
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.teacher = p


def _guard_generate(model):
    """Refuse generation modes that need to roll back the cache, before any work is done."""
    cls_generate = type(model).generate

    def generate(*args, **kwargs):
        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ligerfx: generate({key}=...) needs assisted decoding, which rolls the cache back; "
                                 "a recurrent state cannot be rolled back, so it is not supported")
        gc = kwargs.get("generation_config")
        for key in ("prompt_lookup_num_tokens", "assistant_early_exit"):
            if gc is not None and getattr(gc, key, None) is not None:
                raise ValueError(f"ligerfx: generation_config.{key} needs assisted decoding, which is not supported")
        return cls_generate(model, *args, **kwargs)

    model.generate = generate


def from_pretrained(path, **hf_kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)`` + re-applying the stored ligerfx transform."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
    stored = getattr(model.config, "ligerfx", None)
    if not stored:
        raise ValueError(f"{path}: config.json has no 'ligerfx' entry; this checkpoint was not saved from a "
                         "ligerfx-transformed model (use ligerfx.transform on it instead)")
    config = LigerConfig.from_dict(stored)
    passes = [p for p in stored.get("passes", ["linearize"]) if p == "linearize"]
    return transform(model, passes=passes or ["linearize"], config=config)


def cache_nbytes(cache) -> int:
    from .cache import cache_nbytes as f
    return f(cache)
