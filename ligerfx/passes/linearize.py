"""The linearize pass: softmax attention sites -> Liger attention, derived from each module's own graph.

Contract of ``linearize_graph`` (the pass proper):

* **Takes** an ATen-level FX graph of one attention call, as ``torch.export`` produces it (parameters and buffers
  lifted to placeholders, dynamic batch/sequence sizes as ``sym_size`` nodes). The torch-level spellings Dynamo
  produces are understood by the same matchers (``patterns.opname``).
* **Matches** exactly one softmax attention: ``scaled_dot_product_attention`` (``torch._C._nn``, ``F`` or
  ``aten`` spelling) or the eager ``matmul -> [*scale] -> [+mask] -> softmax -> matmul`` chain. Through the graph it
  sees through GQA (``enable_gqa`` or ``repeat_kv``'s expand/reshape), RoPE (any form: found by data flow from the
  position inputs, which covers rotate-half, partial rotary and q/k norms placed before it), biases and fused qkv
  projections, and recovers: pre-RoPE q and k, the key projection split into heads (the gate source), v, the RoPE'd
  q and k, the scale and the GQA factor.
* **Emits** one ``call_function(liger_site, (q_pre, k_pre, v, gate, q_rope, k_rope, ctx))`` in place of the
  attention (same output shape ``[B, HQ, T, V]``), a new trailing placeholder ``ctx``, ``call_module`` nodes for
  every ``nn.Linear`` (so a LoRA wrapper injected later is called) and ``get_attr`` nodes for other parameters.
  Attention probabilities returned by eager attention become ``None``. Assertion nodes that pin the capture dtype
  or device are removed; dead nodes the rewrite created are erased (in-place ops are kept).
* **Raises** ``UnsupportedAttentionError`` naming the module and what was not found; it never falls back.

The module driver (``linearize_module``) captures each attention module, runs the pass, generates Python from the
rewritten graph with ``self`` bound to the live attention module, and installs it as that module's ``forward``.
The generated forward is checked once per capture against the module's original forward (with softmax attention
in place of Liger), so a mis-wired graph fails at transform time, not as silently wrong numbers.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..config import LigerConfig
from .capture import PROBE_B, PROBE_T, RecordedCall, export_attention
from .patterns import (ASSERTS, UnsupportedAttentionError, ancestors, descendants, find_cores, match_site, opname,
                       projection_of, shape, strip_repeat_kv)

log = logging.getLogger("ligerfx")
counters: Counter = Counter()


@dataclass
class SiteInfo:
    """What the pass recovered from one attention graph."""
    kind: str
    scale: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    q_perm: tuple
    k_perm: tuple
    g_perm: tuple
    projections: dict  # role -> module path relative to the attention module ("" for unknown)


@dataclass
class _Ctx:
    lin: "LinearizedAttention"
    mask: Any = None
    cache: Any = None
    mode: str = "liger"  # "liger" | "check"


def liger_site(q_pre, k_pre, v, gate, q_rope, k_rope, ctx: _Ctx, q_sink=None):
    """Runtime of one rewritten site: the node the pass inserts in place of softmax attention. ``q_sink``: the
    query RoPE'd at the sink position (``LigerConfig.sink_position``), or None."""
    from .. import liger
    from ..cache import liger_layer

    info, cfg = ctx.lin.info, ctx.lin.config
    q_pre, k_pre, gate = q_pre.permute(info.q_perm), k_pre.permute(info.k_perm), gate.permute(info.g_perm)
    if ctx.mode == "check":
        return F.scaled_dot_product_attention(q_rope, k_rope, v, is_causal=True, scale=info.scale,
                                              enable_gqa=q_rope.shape[1] != k_rope.shape[1])
    B, _, T, _ = q_rope.shape
    # a decode step (one token onto a cache) takes the mask as it is: the all-valid shortcut would cost a host sync
    # per layer and token, stalling the launch queue of eager generation, and saves nothing at T == 1
    valid = token_validity(ctx.mask, B, T, shortcut=not (T == 1 and ctx.cache is not None))
    layer = None
    if ctx.cache is not None:
        layer = liger_layer(ctx.cache, ctx.lin.layer_idx, cfg)
    # q_sink exists only where the pass was given a sink position (``lin.sink``)
    return liger.liger_attention(q_pre, k_pre, v, gate, q_rope, k_rope, scale=info.scale, cfg=cfg, valid=valid,
                                 cache=layer, q_sink=q_sink,
                                 sink_position=None if q_sink is None else ctx.lin.sink[0])


def _expand_row(row, like):
    """A positional input's value at the sink position (``[1, 1, D]``), broadcast to the input's shape."""
    return row.to(device=like.device, dtype=like.dtype).expand_as(like)


def token_validity(mask, B: int, T: int, shortcut: bool = True) -> Optional[torch.Tensor]:
    """[B, T] bool validity of the T new tokens, from whatever mask HF built (None = all valid).

    A 4-D mask's diagonal of its last T x T block says whether each token may see itself, i.e. is not padding. Never
    infer padding from mask columns: sliding-window masks hide old keys that are not padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedAttentionError(f"ligerfx: attention masks of type {type(mask).__name__} are not supported; "
                                        "use attn_implementation='sdpa' or 'eager'")
    if mask.dim() == 2:
        v = mask[:, -T:].bool()
    elif mask.dim() == 4:
        d = torch.diagonal(mask[:, 0, -T:, -T:], dim1=-2, dim2=-1)
        v = d if d.dtype == torch.bool else d > torch.finfo(d.dtype).min / 2
    else:
        raise UnsupportedAttentionError(f"ligerfx: unexpected attention mask of shape {tuple(mask.shape)}")
    v = v.expand(B, T)
    # no padding: skip the masking work (a host sync, so not while compiling or capturing a CUDA graph)
    if shortcut and not torch.compiler.is_compiling() and not (v.is_cuda and torch.cuda.is_current_stream_capturing()) \
            and bool(v.all()):
        return None
    return v


# --------------------------------------------------------------------------------------------------- the pass
def linearize_graph(ep: torch.export.ExportedProgram, module: torch.nn.Module, where: str,
                    sink_rows: Optional[list] = None):
    """Rewrite the exported graph of one attention call (see the module docstring). Returns (graph, SiteInfo).

    ``sink_rows`` (one entry per user input, in graph order: its value at the sink position, or None) asks for the
    sink query as well: the RoPE subgraph of the query is cloned with each positional input replaced by its value
    at that position and passed to ``liger_site`` as ``q_sink`` (see ``LigerConfig.sink_position``)."""
    graph = copy.deepcopy(ep.graph)  # a free-standing graph: its call_module targets live on `module`
    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters)
    buffers = {**sig.inputs_to_buffers, **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    user_inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs]
    for n in graph.nodes:
        if n.op == "placeholder" and n.name in params:
            n.meta["ligerfx_param"] = params[n.name].removeprefix("attn.")

    n_before = len(graph.nodes)
    cores = find_cores(graph, where)
    if not cores:
        raise UnsupportedAttentionError(f"{where}: no softmax attention (scaled_dot_product_attention or "
                                        "matmul-softmax-matmul) found in the module's graph")
    if len(cores) > 1:
        raise UnsupportedAttentionError(f"{where}: {len(cores)} attention computations in one module; ligerfx "
                                        "rewrites modules with exactly one")
    core = cores[0]
    q_rope = core.q
    k_rope, v = strip_repeat_kv(core.k), strip_repeat_kv(core.v)
    HQ, HKV = int(shape(q_rope)[1]), int(shape(k_rope)[1])
    if HQ % HKV or int(shape(v)[1]) != HKV:
        raise UnsupportedAttentionError(f"{where}: cannot see through the GQA repeat of k/v "
                                        f"(query heads {HQ}, key heads {HKV}, value heads {shape(v)[1]})")

    # Positional inputs: every user input that the value path does not come from (cos/sin, position ids) and buffers.
    v_anc = ancestors(v) | {v}
    sources = [n for n in user_inputs if n not in v_anc] + [n for n in graph.nodes
                                                           if n.op == "placeholder" and n.name in buffers]
    positional = descendants(sources)
    site = match_site(core, q_rope, k_rope, positional, where)
    q_pre, k_pre, gate, k_proj, scale = site.q_pre, site.k_pre, site.gate, site.k_proj, site.scale
    projections = {"q": _module_of(projection_of(q_pre)), "k": _module_of(k_proj), "v": _module_of(projection_of(v)),
                   "o": _module_of(_projection_after(core.node))}

    # Rewrite.
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_ph):
        ctx = graph.placeholder("ligerfx_ctx")
    q_sink = None
    if sink_rows is not None and q_rope in positional:
        q_sink = _rope_at_sink_position(graph, core.node, q_rope, positional, user_inputs, sink_rows, module, where)
    with graph.inserting_before(core.node):
        new = graph.call_function(liger_site, (q_pre, k_pre, v, gate, q_rope, k_rope, ctx),
                                  {"q_sink": q_sink} if q_sink is not None else {})
    new.meta = dict(core.node.meta)
    core.node.replace_all_uses_with(new)
    out = next(n for n in graph.nodes if n.op == "output")
    if core.weights is not None:
        out.args = pytree.tree_map(lambda a: None if a is core.weights else a, out.args)
    _lower_parameters(graph, module)
    for n in list(graph.nodes):
        if n.op == "call_function" and opname(n) in ASSERTS:
            graph.erase_node(n)
    graph.eliminate_dead_code(is_impure_node=_impure)
    graph.lint()
    counters[f"linearize.{core.kind}"] += 1
    log.debug("ligerfx linearize %s: %s attention -> liger_site; %d nodes before, %d after; q_pre=%s k_pre=%s "
              "gate=%s v=%s q_rope=%s k_rope=%s", where, core.kind, n_before, len(graph.nodes), q_pre.name,
              k_pre.name, gate.name, v.name, q_rope.name, k_rope.name)
    info = SiteInfo(core.kind, scale, HQ, HKV, int(shape(q_rope)[-1]), site.q_perm, site.k_perm, site.g_perm,
                    projections)
    return graph, info


def _rope_at_sink_position(graph, before, q_rope, positional, user_inputs, rows, module, where) -> fx.Node:
    """Clone the query's position-dependent subgraph (RoPE, whatever its form) with every positional user input
    replaced by its recorded value at the sink position (a buffer on ``module``, broadcast to the input's shape).
    Returns the clone of ``q_rope``: the same query, RoPE'd at the sink position."""
    anc = ancestors(q_rope)
    region = [n for n in graph.nodes if (n in anc or n is q_rope) and n in positional]
    mapping = {}
    with graph.inserting_before(before):
        for i, ph in enumerate(user_inputs):
            if ph not in region:
                continue
            row = rows[i] if i < len(rows) else None
            if row is None:
                raise UnsupportedAttentionError(f"{where}: the positional input {ph.name!r} of the query's RoPE has "
                                                "no value recorded at the sink position; use sink_position='absolute'")
            name = f"_ligerfx_sink_input_{i}"
            module.register_buffer(name, row, persistent=False)
            mapping[ph] = graph.call_function(_expand_row, (graph.get_attr(name), ph))
        if not mapping:
            raise UnsupportedAttentionError(f"{where}: the query's RoPE reads no positional user input; use "
                                            "sink_position='absolute'")
        for n in region:
            if n.op == "placeholder":
                continue
            mapping[n] = graph.node_copy(n, lambda a: mapping.get(a, a))
    counters["linearize.sink_query"] += 1
    return mapping[q_rope]


# Ops FX calls impure only because they may draw random numbers (``nondeterministic_seeded``: SDPA and dropout
# take a dropout_p). Once the softmax attention they belong to is replaced they are dead and must go: leaving them
# keeps an O(T^2) softmax attention running beside the linear one, its result thrown away.
_RANDOM_BUT_PURE = {"scaled_dot_product_attention", "dropout", "native_dropout", "feature_dropout"}


def _impure(n: fx.Node) -> bool:
    """Keep placeholders, outputs, in-place ops and anything with side effects: FX's default check deletes
    ``call_method copy_`` (cache writes) as dead code. Dropout and SDPA count as pure (see ``_RANDOM_BUT_PURE``)."""
    if n.op in ("placeholder", "output"):
        return True
    name = opname(n)
    if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
        return True
    if n.op in ("call_module", "get_attr"):
        return False
    if name in _RANDOM_BUT_PURE:
        return False
    return n.is_impure()


def _module_of(n: Optional[fx.Node]) -> str:
    if n is None:
        return ""
    for a in n.all_input_nodes:
        fqn = a.meta.get("ligerfx_param")
        if fqn and fqn.endswith(".weight"):
            return fqn[: -len(".weight")]
    return ""


def _projection_after(n: fx.Node) -> Optional[fx.Node]:
    frontier, seen = [n], set()
    while frontier:
        nxt = []
        for y in frontier:
            for u in y.users:
                if u in seen:
                    continue
                seen.add(u)
                if opname(u) in {"linear", "addmm", "matmul"} and any(a.meta.get("ligerfx_param")
                                                                     for a in u.all_input_nodes):
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def _lower_parameters(graph: fx.Graph, module: torch.nn.Module):
    """Parameters -> live attributes of the attention module: ``nn.Linear`` calls become ``call_module`` (so LoRA
    wrappers injected later run), other parameters and buffers ``get_attr``."""
    for n in list(graph.nodes):
        if opname(n) != "linear":
            continue
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        fqn = w.meta.get("ligerfx_param", "") if isinstance(w, fx.Node) else ""
        if not fqn.endswith(".weight"):
            continue
        owner = fqn[: -len(".weight")]
        try:
            lin = module.get_submodule(owner)
        except AttributeError:
            continue
        if not isinstance(lin, torch.nn.Linear):
            continue
        bias_ok = (b is None and lin.bias is None) or (
            isinstance(b, fx.Node) and b.meta.get("ligerfx_param") == owner + ".bias")
        if not bias_ok:
            continue
        with graph.inserting_before(n):
            m = graph.call_module(owner, (x,))
        m.meta = dict(n.meta)
        n.replace_all_uses_with(m)
        graph.erase_node(n)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for n in list(graph.nodes):
        if n.op != "placeholder" or n.name == "ligerfx_ctx" or n.meta.get("ligerfx_user"):
            continue
        target = n.meta.get("ligerfx_param") or n.meta.get("ligerfx_buffer")
        if target is None:
            continue
        if n.users:
            with graph.inserting_before(first):
                a = graph.get_attr(target)
            a.meta = dict(n.meta)
            n.replace_all_uses_with(a)
        graph.erase_node(n)


# --------------------------------------------------------------------------------------------- module driver
@dataclass
class LinearizedAttention:
    """Per-module state of a linearized attention: recorded call, generated forwards (one per dtype/device)."""
    path: str
    layer_idx: int
    config: LigerConfig
    call: RecordedCall
    info: Optional[SiteInfo] = None
    paths: list = field(default_factory=list)
    used: list = field(default_factory=list)
    out_spec: Any = None
    fns: dict = field(default_factory=dict)
    teacher: bool = False
    sink: Any = None  # (sink position P, the recorded attention arguments at P) or None

    def forward_for(self, module, dtype, device):
        key = (dtype, device)
        if key not in self.fns:
            self.fns[key] = self._build(module, dtype, device)
        return self.fns[key]

    def _build(self, module, dtype, device):
        args = self.call.template(dtype, device)
        with _lora_as_base(module):
            fn = self._rewrite(module, args)
        self._check(module, fn, args)
        return fn

    def _rewrite(self, module, args):
        ep, paths = export_attention(module, args)
        sig = ep.graph_signature
        buffers = {**sig.inputs_to_buffers, **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
        for n in ep.graph.nodes:
            if n.op == "placeholder":
                if n.name in sig.user_inputs:
                    n.meta["ligerfx_user"] = True
                elif n.name in buffers:
                    fqn = buffers[n.name].removeprefix("attn.")
                    if fqn not in dict(module.named_buffers()):  # lifted constant: keep it on the module
                        const = ep.constants[buffers[n.name]]
                        name = f"_ligerfx_const_{len([k for k, _ in module.named_buffers()])}"
                        module.register_buffer(name, const, persistent=False)
                        fqn = name
                    n.meta["ligerfx_buffer"] = fqn
        rows = None
        if self.sink is not None:
            rows = []
            for path, x in zip(paths, (_get_or_none(args, p) for p in paths)):
                r = _get_or_none(self.sink[1], path)
                rows.append(r.to(dtype=x.dtype, device=x.device) if isinstance(r, torch.Tensor) and
                            isinstance(x, torch.Tensor) else None)
        graph, info = linearize_graph(ep, module, self.path, sink_rows=rows)
        if self.info is not None and self.info.projections != info.projections:
            raise UnsupportedAttentionError(f"{self.path}: graph changed between captures")
        self.info = info
        self.paths = paths
        self.used = [len(n.users) > 0 for n in graph.nodes if n.op == "placeholder" and n.name != "ligerfx_ctx"]
        self.out_spec = ep.call_spec.out_spec
        code = graph.python_code(root_module="self")
        glb = dict(code.globals)
        exec(compile(code.src, f"<ligerfx {self.path}>", "exec"), glb)
        fn = glb["forward"]
        log.debug("ligerfx: %s rewritten (%s):\n%s", self.path, info.kind, code.src)
        return fn

    def flat_inputs(self, arguments: dict) -> list:
        flat = []
        for path, used in zip(self.paths, self.used):
            x = _get_or_none(arguments, path)
            if x is None and used:
                raise TypeError(f"{self.path}: the attention forward was called without "
                                f"{pytree.keystr(path)}, which its graph needs")
            flat.append(x)
        return flat

    @torch.no_grad()
    def _check(self, module, fn, args):
        """Generated graph with softmax in place of Liger == the original forward, at another batch/length."""
        B, T = 2, 5

        def shrink(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == PROBE_B and x.shape[1] == PROBE_T:
                return x[:B, :T].clone()
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == PROBE_T:
                return x[:, :T].clone()
            return x
        small = pytree.tree_map(shrink, args)
        hidden = next(x for x in pytree.tree_leaves(small) if isinstance(x, torch.Tensor) and x.is_floating_point())
        mask = torch.full((T, T), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
        mask = mask.expand(B, 1, T, T)
        kwargs = dict(small)
        kwargs["attention_mask"] = mask
        was = module.training
        module.eval()
        try:
            ref = type(module).forward(module, **kwargs)
            out = fn(module, *self.flat_inputs(small), _Ctx(self, mode="check"))
        finally:
            module.train(was)
        ref0 = ref[0] if isinstance(ref, (tuple, list)) else ref
        out0 = pytree.tree_unflatten(list(out), self.out_spec)
        out0 = out0[0] if isinstance(out0, (tuple, list)) else out0
        tol = 1e-4 if hidden.dtype == torch.float32 else (1e-6 if hidden.dtype == torch.float64 else 3e-2)
        err = ((out0.float() - ref0.float()).norm() / ref0.float().norm().clamp_min(1e-12)).item()
        if not err <= tol:
            raise UnsupportedAttentionError(f"{self.path}: the rewritten graph does not reproduce the original "
                                            f"attention (relative error {err:.2e} with softmax in place of Liger)")


@contextlib.contextmanager
def _lora_as_base(module: torch.nn.Module):
    """Capture with LoRA wrappers replaced by their base ``nn.Linear``: the graph then calls e.g. ``self.k_proj``,
    which at run time is the LoRA wrapper again (so the gate sees the LoRA delta)."""
    swapped = []
    for name, child in list(module.named_modules()):
        base = getattr(child, "base_layer", None)
        if name and isinstance(base, torch.nn.Linear) and hasattr(child, "lora_A"):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, base)
            swapped.append((parent, attr, child))
    try:
        yield
    finally:
        for parent, attr, child in swapped:
            setattr(parent, attr, child)


def _get_or_none(tree, path):
    try:
        return _get(tree, path)
    except (KeyError, IndexError, TypeError):
        return None


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", None))]
    return tree


def _liger_forward(self, *args, **kwargs):
    lin: LinearizedAttention = self._ligerfx
    if lin.teacher:
        return type(self).forward(self, *args, **kwargs)
    if args:
        from .capture import _bind
        arguments, _ = _bind(self, args, kwargs)
    else:
        arguments = kwargs
    flat = lin.flat_inputs(arguments) if lin.paths else None
    hidden = next(x for x in pytree.tree_leaves(arguments) if isinstance(x, torch.Tensor) and x.is_floating_point())
    fn = lin.forward_for(self, hidden.dtype, hidden.device)
    if flat is None:
        flat = lin.flat_inputs(arguments)
    cache = arguments.get("cache", arguments.get("past_key_values", arguments.get("past_key_value")))
    out = fn(self, *flat, _Ctx(lin, mask=arguments.get("attention_mask"), cache=cache))
    return pytree.tree_unflatten(list(out), lin.out_spec)


def linearize_module(module: torch.nn.Module, path: str, layer_idx: int, call: RecordedCall,
                     config: LigerConfig, sink=None) -> LinearizedAttention:
    """Capture, rewrite and install the Liger forward on one attention module (in place; no new parameters).
    ``sink``: ``(P, arguments at P)`` to score attention sinks from position P (``LigerConfig.sink_position``)."""
    lin = LinearizedAttention(path, layer_idx, config, call, sink=sink)
    p = next(module.parameters())
    lin.forward_for(module, p.dtype, p.device)
    module._ligerfx = lin
    module.forward = types.MethodType(_liger_forward, module)
    counters["linearize"] += 1
    return lin
