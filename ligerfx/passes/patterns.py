"""Graph vocabulary shared by the passes: canonical op names and the matchers for attention sites.

Works on both graph forms ligerfx meets:

* torch-level FX from Dynamo (``torch._C._nn.scaled_dot_product_attention``, ``torch.matmul``, ``operator.mul``,
  ``call_method view``...), as a ``torch.compile`` backend receives it;
* ATen-level FX from ``torch.export`` (``aten.scaled_dot_product_attention.default``, ``aten.linear.default``...).

Every matcher reads ``node.meta["val"]`` (fake tensors) for shapes, never module names.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function


class UnsupportedAttentionError(RuntimeError):
    """An attention module the linearize pass cannot rewrite. The message names the module and what was missing."""


_PY_OPS = {operator.mul: "mul", operator.add: "add", operator.sub: "sub", operator.truediv: "div",
           operator.neg: "neg", operator.getitem: "getitem", operator.matmul: "matmul"}


def opname(n: fx.Node) -> str:
    """Canonical name of what a node computes: ``"view"``, ``"linear"``, ``"scaled_dot_product_attention"``..."""
    if n.op == "call_method":
        return n.target
    if n.op == "call_module":
        return "call_module"
    if n.op != "call_function":
        return n.op
    t = n.target
    if t in _PY_OPS:
        return _PY_OPS[t]
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__.lstrip("_") if t.overloadpacket.__name__ != "_unsafe_view" else "view"
    name = getattr(t, "__name__", str(t))
    return name.lstrip("_")


SDPA = {"scaled_dot_product_attention"}
# Ops that only move, select or re-type values: walking through them keeps "the same tensor".
REARRANGE = {"view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "expand", "slice",
             "getitem", "split", "split_with_sizes", "chunk", "narrow", "select", "clone", "alias", "to", "float",
             "type_as", "flatten", "unflatten", "unbind", "_to_copy", "to_copy", "half", "bfloat16", "type"}
# Ops allowed when walking from RoPE inputs back to the pre-RoPE tensor (rotate_half adds neg and cat).
ROPE_WALK = REARRANGE | {"neg", "cat", "stack", "flip"}
ASSERTS = {"assert_tensor_metadata", "assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
           "assert_async"}


def val(n: Any):
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val")
    return v if v is not None else n.meta.get("example_value")  # export graphs / Dynamo graphs


def shape(n: fx.Node) -> tuple:
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if isinstance(val(a), torch.Tensor)]


def args_of(n: fx.Node) -> dict[str, Any]:
    """Arguments by schema name (works for aten overloads and torch functions)."""
    if n.op == "call_function":
        try:
            r = normalize_function(n.target, tuple(n.args), dict(n.kwargs), normalize_to_only_use_kwargs=True)
        except Exception:
            r = None
        if r is not None:
            return dict(r.kwargs)
    return {}


def _reach(starts, step) -> set[fx.Node]:
    seen, stack = set(), list(starts)
    while stack:
        for a in step(stack.pop()):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def ancestors(n: fx.Node) -> set[fx.Node]:
    """Nodes ``n`` depends on (not ``n`` itself)."""
    return _reach([n], lambda x: x.all_input_nodes)


def descendants(nodes) -> set[fx.Node]:
    """``nodes`` and every node that depends on one of them."""
    return set(nodes) | _reach(nodes, lambda x: x.users)


def perm_to(src: tuple, dst: tuple) -> Optional[tuple[int, ...]]:
    """A permutation p with ``src[p[i]] == dst[i]`` (identity and swaps of dims 1/2 preferred), or None."""
    if len(src) != len(dst):
        return None
    key = lambda s: tuple(str(d) for d in s)  # noqa: E731  (SymInts compare by symbol)
    cands = [p for p in permutations(range(len(src))) if key(src[i] for i in p) == key(dst)]
    if not cands:
        return None
    prefer = [tuple(range(len(src)))]
    if len(src) == 4:
        prefer.append((0, 2, 1, 3))
    for p in prefer:
        if p in cands:
            return p
    return cands[0]


# ----------------------------------------------------------------------------------------------------- matchers
@dataclass
class Core:
    """The softmax attention in a graph: its inputs as SDPA sees them and the node to replace."""
    kind: str  # "sdpa" | "eager"
    node: fx.Node  # output node of the attention ([B, HQ, T, V])
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: Optional[float]
    weights: Optional[fx.Node] = None  # eager: the probabilities node (also returned by HF)
    dead: list = field(default_factory=list)


def find_cores(graph: fx.Graph, where: str) -> list[Core]:
    """All softmax-attention sites: SDPA calls, and matmul -> [scale] -> [mask] -> softmax -> matmul chains."""
    cores = []
    for n in graph.nodes:
        name = opname(n)
        if name in SDPA:
            a = args_of(n)
            q = a.get("query", n.args[0])
            k = a.get("key", n.args[1] if len(n.args) > 1 else None)
            v = a.get("value", n.args[2] if len(n.args) > 2 else None)
            cores.append(Core("sdpa", n, q, k, v, a.get("scale", n.kwargs.get("scale"))))
        elif name == "softmax":
            c = _match_eager(n, where)
            if c is not None:
                cores.append(c)
    return cores


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = [u for u in n.users if opname(u) not in ASSERTS]
    return users[0] if len(users) == 1 else None


def _match_eager(sm: fx.Node, where: str) -> Optional[Core]:
    """``softmax(matmul(q, k^T) * s [+ mask]) [-> to] [-> dropout] @ v`` (HF ``eager_attention_forward``)."""
    x = sm.args[0]
    if len(shape(sm)) != 4:
        return None
    scale, chain = None, []
    while isinstance(x, fx.Node) and opname(x) in {"add", "mul", "div", "to", "float", "sub"}:
        name = opname(x)
        if name == "mul" and any(isinstance(a, (int, float)) for a in x.args):
            scale = float(next(a for a in x.args if isinstance(a, (int, float))))
            x = next(a for a in x.args if isinstance(a, fx.Node))
        elif name == "div" and isinstance(x.args[1], (int, float)):
            scale = 1.0 / float(x.args[1])
            x = x.args[0]
        elif name == "add":  # additive mask: follow the score operand (the one that comes from a matmul)
            ops = [a for a in x.args if isinstance(a, fx.Node)]
            x = next((a for a in ops if opname(a) in {"matmul", "mul", "div", "bmm"}), ops[0])
        elif name in {"to", "float"}:
            x = x.args[0]
        else:
            return None
        chain.append(x)
    if not isinstance(x, fx.Node) or opname(x) not in {"matmul", "bmm"}:
        if isinstance(x, fx.Node) and opname(x) == "tanh":
            raise UnsupportedAttentionError(f"{where}: attention logit soft-capping (tanh before softmax) is not supported")
        return None
    q, kt = x.args[0], x.args[1]
    if opname(kt) not in {"transpose", "permute"}:
        return None
    k = kt.args[0]
    # forward: softmax -> [to] -> [dropout] -> matmul(p, v)
    y, weights = sm, sm
    while True:
        u = [u for u in y.users if opname(u) not in ASSERTS]
        mm = [w for w in u if opname(w) in {"matmul", "bmm"} and w.args[0] is y]
        if mm:
            out = mm[0]
            break
        nxt = [w for w in u if opname(w) in {"to", "dropout", "type_as", "float", "native_dropout"}]
        if not nxt:
            return None
        y = weights = nxt[0]
    return Core("eager", out, q, k, out.args[1], scale, weights=weights)


def strip_repeat_kv(x: fx.Node) -> fx.Node:
    """See through GQA's ``repeat_kv``: ``x[:, :, None, :, :].expand(B, H, n, T, D).reshape(B, H * n, T, D)``
    (or ``repeat_interleave(x, n, dim=1)``) and return the tensor with the KV heads; ``x`` if there is none."""
    cur, seen_expand = x, False
    while isinstance(cur, fx.Node) and opname(cur) in {"reshape", "view", "expand", "slice", "unsqueeze", "getitem",
                                                         "contiguous", "clone", "repeat_interleave"}:
        name = opname(cur)
        if name == "repeat_interleave":
            return cur.args[0]
        if name == "expand":
            seen_expand = True
        src = cur.args[0]
        if seen_expand and name in {"unsqueeze", "getitem"} and len(shape(cur)) == 5 and len(shape(src)) == 4:
            return src
        cur = src
    return x


def rope_input(x: fx.Node, positional: set[fx.Node], roots: frozenset = frozenset()) -> fx.Node:
    """The tensor RoPE was applied to (pre-RoPE q or k), found by data flow, not by pattern.

    ``positional`` are the nodes that depend on positions (cos/sin, position ids; ``roots`` are where they enter
    the module). RoPE's output depends on them;
    its data inputs do not. The pre-RoPE tensor is the latest node from which every data input of the RoPE region
    is reachable through pure rearrangements (slices, ``neg``/``cat`` of rotate_half, partial-rotary splits).
    Returns ``x`` itself when ``x`` does not depend on positions (no RoPE, e.g. learned position embeddings).
    """
    if x not in positional:
        return x
    region = {a for a in ancestors(x) if a in positional} | {x}
    feeders = set()
    for r in region:
        if r in roots:  # a positional input (cos/sin computed outside the module): its own inputs do not count
            continue
        for a in r.all_input_nodes:
            if a not in positional and isinstance(val(a), torch.Tensor) and a.op != "placeholder":
                feeders.add(a)
            elif a.op == "placeholder" and a not in positional and isinstance(val(a), torch.Tensor):
                feeders.add(a)
    feeders = {f for f in feeders if f.op != "get_attr" and not f.meta.get("ligerfx_param")}
    if not feeders:
        raise LookupError("RoPE region has no data input")

    def closure(f):
        out, stack = {f}, [f]
        while stack:
            y = stack.pop()
            if opname(y) in ROPE_WALK:
                for a in data_inputs(y):
                    if a not in out:
                        out.add(a)
                        stack.append(a)
        return out

    common = set.intersection(*(closure(f) for f in feeders))
    if not common:
        raise LookupError(f"RoPE data inputs {sorted(f.name for f in feeders)} have no common source")
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return max(common, key=order.__getitem__)


def is_projection(n: fx.Node) -> bool:
    name = opname(n)
    if name in {"linear", "addmm"}:
        return True
    if name == "call_module":
        return True
    if name in {"matmul", "mm"}:
        return any(a.meta.get("ligerfx_param") for a in n.all_input_nodes)
    return False


def projection_of(x: fx.Node) -> Optional[fx.Node]:
    """The nearest projection (linear layer) upstream of ``x``."""
    frontier, seen = [x], set()
    found = []
    while frontier:
        nxt = []
        for y in frontier:
            for a in tensor_inputs(y):
                if a in seen or a.meta.get("ligerfx_param"):
                    continue
                seen.add(a)
                (found if is_projection(a) else nxt).append(a)
        if found:
            return found[0] if len(set(found)) == 1 else None
        frontier = nxt
    return None


def data_inputs(n: fx.Node) -> list[fx.Node]:
    """The operands a rearrangement moves data from (``type_as(x, ref)`` reads only ``ref``'s dtype)."""
    if opname(n) in {"cat", "stack"}:
        return [a for a in n.args[0] if isinstance(a, fx.Node)]
    first = n.args[0] if n.args else None
    return [first] if isinstance(first, fx.Node) else tensor_inputs(n)


def gate_source(proj: fx.Node, k_pre: fx.Node) -> fx.Node:
    """The key projection output split into heads, before any norm or rotary: the Liger gate source.

    Walks down from the projection towards ``k_pre`` through pure rearrangements (view, slice, split of a fused qkv,
    transpose) and stops before the first op that changes values (RMSNorm, RoPE)."""
    anc = ancestors(k_pre) | {k_pre}
    cur = proj
    while cur is not k_pre:
        nxt = [u for u in cur.users if u in anc and opname(u) in REARRANGE and cur in data_inputs(u)]
        if len(nxt) != 1 or len(shape(nxt[0])) == 0:
            break
        cur = nxt[0]
    return cur


@dataclass
class Site:
    """The tensors Liger attention needs, recovered from one softmax-attention core."""
    q_pre: fx.Node
    k_pre: fx.Node
    gate: fx.Node
    k_proj: fx.Node
    q_perm: tuple
    k_perm: tuple
    g_perm: tuple
    scale: float


def match_site(core: Core, q_rope: fx.Node, k_rope: fx.Node, positional: set, where: str,
               roots: frozenset = frozenset()) -> Site:
    """Pre-RoPE q/k, the gate source and their layouts relative to the attention inputs, or a clear error."""
    try:
        q_pre, k_pre = rope_input(q_rope, positional, roots), rope_input(k_rope, positional, roots)
    except LookupError as e:
        raise UnsupportedAttentionError(f"{where}: could not find the pre-RoPE query/key: {e}") from None
    k_proj = projection_of(k_pre)
    if k_proj is None:
        raise UnsupportedAttentionError(f"{where}: no key projection (linear layer) found upstream of the key")
    gate = gate_source(k_proj, k_pre)
    perms = []
    for name, node, ref in (("q", q_pre, q_rope), ("k", k_pre, k_rope), ("gate", gate, k_rope)):
        p = perm_to(shape(node), shape(ref))
        if p is None:
            raise UnsupportedAttentionError(f"{where}: the {name} tensor before RoPE/norm has shape {shape(node)}, "
                                            f"which is not a permutation of the attention input {shape(ref)}")
        perms.append(p)
    scale = core.scale if core.scale is not None else float(shape(q_rope)[-1]) ** -0.5
    return Site(q_pre, k_pre, gate, k_proj, perms[0], perms[1], perms[2], float(scale))
