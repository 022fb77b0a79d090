"""``torch.compile(model, backend="ligerfx")``: the linearize pass as a Dynamo backend.

* **Untransformed model, full-sequence graph** (training, scoring): every softmax attention in the captured
  torch-level graph is rewritten into Liger attention with the same matchers as ``ligerfx.transform`` (restricted to
  the nodes of each attention module, found from ``nn_module_stack``), then the graph is lowered by Inductor.
* **Untransformed model, decode graph** (a softmax KV cache as input): refused with a clear error — a recurrent
  state cannot be rebuilt from a KV cache; call ``ligerfx.transform`` first.
* **Transformed model**: the graph already holds the ``ligerfx::`` custom ops; nothing is rewritten, the graph is
  lowered around them. A graph is recognised as a transformed model's by its parameters (``transform`` registers
  them), so its softmax attention is never linearized: inside ``ligerfx.teacher_mode`` (self-distillation: the
  teacher's graph has no ligerfx op) nor a layer a hybrid model kept, even in a graph piece without ligerfx ops.

``make_backend(inner)`` builds the same backend with another lowering (``"aot_eager"`` for fast CPU tests).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx
from torch._dynamo import register_backend

from .config import LigerConfig
from .passes.linearize import _impure, counters, token_validity
from .passes.patterns import UnsupportedAttentionError, find_cores, match_site, opname, strip_repeat_kv

log = logging.getLogger("ligerfx")


@functools.lru_cache(maxsize=None)
def _config(window, mix, gate_normalizer, sinks, variant):
    return LigerConfig(window=window, mix=mix, gate_normalizer=gate_normalizer, sinks=sinks, variant=variant)


def backend_site(q_pre, k_pre, v, gate, q_rope, k_rope, mask, *, scale, window, mix, gate_normalizer, sinks,
                 variant, q_perm, k_perm, g_perm):
    """Liger attention for a full-sequence graph (no cache); the node the backend inserts."""
    from . import liger
    cfg = _config(window, mix, gate_normalizer, sinks, variant)
    B, _, T, _ = q_rope.shape
    valid = token_validity(mask, B, T, shortcut=False)
    return liger.liger_attention(q_pre.permute(q_perm), k_pre.permute(k_perm), v, gate.permute(g_perm), q_rope,
                                 k_rope, scale=scale, cfg=cfg, valid=valid, cache=None)


def _is_param(n: fx.Node) -> bool:
    ga = n.meta.get("grapharg")
    name = ga.source.name if ga is not None and hasattr(ga.source, "name") else n.name
    return n.op == "get_attr" or "_parameters" in name or "parameters_" in name


def _strip_cache_cat(x: fx.Node, where: str) -> fx.Node:
    """``torch.cat([past, new], dim=-2)`` of a ``DynamicLayer`` -> ``new``. A past that is a graph input means this
    is a decode step of a softmax-cache model: refuse."""
    if opname(x) != "cat":
        return x
    parts = x.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return x
    past, new = parts
    if isinstance(past, fx.Node) and opname(past) in {"tensor", "empty", "new_empty", "zeros"}:
        return new
    raise UnsupportedAttentionError(
        f"{where}: this graph is a decode step of an untransformed model (its keys come from a softmax KV cache); "
        "the ligerfx backend cannot build a recurrent state from a KV cache. Call ligerfx.transform(model) first, "
        "then torch.compile the transformed model.")


def _local_inputs(x: fx.Node, local: set) -> set:
    """Nodes outside ``local`` that ``x`` reads through a path inside ``local`` (the module's own inputs of x)."""
    out, seen, stack = set(), {x}, [x]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in local:
                stack.append(a)
            else:
                out.add(a)
    return out


def _local_descendants(sources, local: set) -> set:
    """``sources`` and what depends on them through nodes of ``local`` only (other layers are not followed)."""
    out, stack = set(sources), list(sources)
    while stack:
        for u in stack.pop().users:
            if u in local and u not in out:
                out.add(u)
                stack.append(u)
    return out


def linearize_fx(gm: fx.GraphModule, config: LigerConfig) -> int:
    """Rewrite every softmax attention of a Dynamo (torch-level) graph into Liger attention; returns the count."""
    graph = gm.graph
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and
           n.target.namespace == "ligerfx" for n in graph.nodes):
        return 0  # a transformed model: the ligerfx ops are already there
    for n in graph.nodes:
        if n.op == "placeholder" and _is_param(n):
            n.meta["ligerfx_param"] = n.name
    if config.n_sinks > 0 and config.sink_position != "absolute" and find_cores(graph, "graph"):
        log.warning("ligerfx backend: an untransformed model compiled with sinks scores them at their true "
                    "distance (LigerConfig.sink_position needs ligerfx.transform, which records the model's RoPE at "
                    "that position); transform the model first, then torch.compile it")
    count = 0
    for core in find_cores(graph, "graph"):
        stack = core.node.meta.get("nn_module_stack") or {}
        key, (where, _) = list(stack.items())[-1] if stack else (None, ("<graph>", None))
        local = {n for n in graph.nodes if key in (n.meta.get("nn_module_stack") or {})}
        q_rope = core.q
        k_rope = _strip_cache_cat(strip_repeat_kv(core.k), where)
        v = _strip_cache_cat(strip_repeat_kv(core.v), where)
        external = {a for n in local for a in n.all_input_nodes if a not in local}
        v_inputs = _local_inputs(v, local)
        sources = [a for a in external if a not in v_inputs and not a.meta.get("ligerfx_param")]
        positional = _local_descendants(sources, local)
        site = match_site(core, q_rope, k_rope, positional, where, roots=frozenset(sources))
        mask = core.node.kwargs.get("attn_mask", core.node.args[3] if len(core.node.args) > 3 else None) \
            if core.kind == "sdpa" else None
        kwargs = dict(scale=site.scale, window=config.window, mix=config.mix,
                      gate_normalizer=config.gate_normalizer, sinks=config.sinks, variant=config.variant,
                      q_perm=site.q_perm, k_perm=site.k_perm, g_perm=site.g_perm)
        with graph.inserting_before(core.node):
            new = graph.call_function(backend_site, (site.q_pre, site.k_pre, v, site.gate, q_rope, k_rope, mask),
                                      kwargs)
        new.meta = dict(core.node.meta)
        core.node.replace_all_uses_with(new)
        count += 1
    if count:
        graph.eliminate_dead_code(is_impure_node=_impure)
        graph.lint()
        gm.recompile()
    counters["backend.linearize"] += count
    log.debug("ligerfx backend: %d attention sites rewritten", count)
    return count


def make_backend(inner: str = "inductor", config: LigerConfig | None = None):
    config = config or LigerConfig()

    def ligerfx_backend(gm: fx.GraphModule, example_inputs, **kwargs):
        from .api import is_transformed_param

        if any(is_transformed_param(t) for t in example_inputs):
            # a transformed model's graph: its ligerfx ops stay as they are, and softmax attention in it stays
            # softmax: the teacher_mode forward, or a layer a hybrid model (`layers=[...]`) kept, even in a graph
            # piece without any ligerfx op
            counters["backend.transformed_graphs"] += 1
        else:
            linearize_fx(gm, config)
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        return gm.forward

    return ligerfx_backend


register_backend(name="ligerfx")(make_backend("inductor"))
