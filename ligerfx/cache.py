"""Constant-size, static-address decode state of a linearized layer, living inside Hugging Face's ``Cache``.

A ``LigerLayer`` replaces the KV-cache layer HF created for a linearized attention layer (in place in
``cache.layers``), so stock ``model.generate()`` works unchanged. Per sequence it holds:

* the GLA state, fp32, ``[B, HKV, K, V]`` — once per KV head;
* a ring of the last ``window`` RoPE'd keys/values ``[B, HKV, window, D]`` in the model dtype with their positions
  ``[B, window]`` (``-1`` = empty), and ``sinks`` sink slots for the window+sinks variant;
* for ``variant="complementary"`` also the ring tokens' pre-RoPE keys and gate inputs (``win_kp``, ``win_gs``), so
  that a token enters the GLA state (``[B, HKV, K, V + 1]``, the last column its normaliser) when it leaves the ring;
* the count of valid tokens seen per sequence ``[B]`` (positions continue across calls, left padding included) and
  the count of tokens fed, padding included (HF's sequence length), as a 0-d tensor.

The buffers are allocated once (at the first prefill, or ahead of time with ``allocate`` / ``new_cache``) and from
then on only written in place: token ``p`` of a sequence goes to ring slot ``p % window`` (a prefill longer than the
ring writes only its last ``window`` valid tokens), and the window branch reads the ring oldest-first by a
per-sequence rotation. A decode step therefore has fixed shapes, fixed tensor addresses and no data-dependent Python
control flow: compiled generation is one prefill graph plus one decode graph, and a decode step can be captured in a
CUDA graph.

HF's mask builder asks each layer for mask sizes. When another layer of the same kind (full / sliding) stays
softmax attention, a Liger layer reports that layer's sizes (the softmax layer needs them; the new tokens are the
last columns either way). Otherwise only Liger layers read the mask, and only the padding of the new tokens (the
diagonal of its last ``T x T`` block), so the layer reports a ``T x T`` mask at offset "tokens seen": static in
shape. The offset is a Python int in eager code and the device counter under ``torch.compile`` or CUDA-graph
capture (as HF's ``StaticLayer`` returns its length as a tensor), so no step-dependent integer enters a graph.
Compiled or captured decode steps therefore take position ids and no mask (or a 4-D one): ``generate()`` builds
the 4-D mask outside the compiled forward by itself, because the cache is compileable. A 2-D mask inside a compiled
step stays correct but graph-breaks (HF's ``prepare_padding_mask`` branches on the offset). In a hybrid model the
softmax layers' keys grow, so the layer keeps its host count exact there and compiled decoding is dynamic.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

_BUFFERS = ("state", "seen", "length", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos", "win_kp",
            "win_gs")
_PER_SEQUENCE = ("state", "seen", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos", "win_kp", "win_gs")


def _capturing(t: torch.Tensor) -> bool:
    """Inside ``torch.cuda.graph`` capture: no host syncs allowed, and host-side Python does not run on replay."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class LigerLayer(CacheLayerMixin):
    """Decode state of one linearized attention layer.

    Args:
        window (int): ring slots (the window branch's previous tokens); 0 keeps no ring.
        sinks (int): sink slots (the first ``sinks`` tokens stay visible to the window branch). Default: 0.
        is_sliding (bool): whether the replaced HF layer was a sliding-window layer (decides which HF mask the
            layer sizes). Default: False.
        sliding_window (int, Optional): that layer's window. Default: None.
        recurrent (bool): keep a GLA state (False for the window-only ``swa_sinks`` variant). Default: True.
        windowed (bool): keep the ring and sink slots (False for pure GLA, ``mix=1``). Default: True.
        complementary (bool): ``variant="complementary"``: the state holds only tokens that left the ring, so the
            ring also keeps their pre-RoPE keys and gate inputs, and the state has one more value column (the
            normaliser). Default: False.
    """

    is_compileable = True
    is_croppable = False
    supports_early_init = False  # HF's early init passes key shapes only; use ``allocate`` or ``new_cache``

    def __init__(self, window: int, sinks: int = 0, is_sliding: bool = False, sliding_window: Optional[int] = None,
                 recurrent: bool = True, windowed: bool = True, complementary: bool = False):
        super().__init__()
        self.complementary = bool(complementary)
        if self.complementary and not (recurrent and windowed):
            raise ValueError("LigerLayer: complementary=True needs both the state and the ring")
        self.window, self.sinks = int(window), int(sinks)
        self.is_sliding, self.sliding_window = bool(is_sliding), sliding_window
        self.recurrent, self.windowed = bool(recurrent), bool(windowed)
        self.state: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # [B] valid tokens so far
        self.length: Optional[torch.Tensor] = None  # [] tokens fed so far, padding included
        self.win_k = self.win_v = self.win_pos = None
        self.sink_k = self.sink_v = self.sink_pos = None
        self.win_kp = self.win_gs = None
        self._host_length: Optional[int] = 0  # host copy of ``length``; None once compiled/replayed steps ran
        self._fresh = True  # nothing fed yet
        self._layers: Optional[list] = None  # the owning cache's layer list (for the mask sizes)

    # ------------------------------------------------------------------------------------------ allocation
    def allocate(self, batch_size: int, num_kv_heads: int, head_dim: int, v_head_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None) -> "LigerLayer":
        """Allocate every buffer (zero state, empty ring) once; later calls only write into them."""
        B, H, K = int(batch_size), int(num_kv_heads), int(head_dim)
        V = K if v_head_dim is None else int(v_head_dim)
        new = dict(seen=torch.zeros(B, dtype=torch.long, device=device),
                   length=torch.zeros((), dtype=torch.long, device=device))
        if self.recurrent:
            new["state"] = torch.zeros(B, H, K, V + self.complementary, dtype=torch.float32, device=device)
        if self.windowed and self.window > 0:
            new.update(win_k=torch.zeros(B, H, self.window, K, dtype=dtype, device=device),
                       win_v=torch.zeros(B, H, self.window, V, dtype=dtype, device=device),
                       win_pos=torch.full((B, self.window), -1, dtype=torch.long, device=device))
            if self.complementary:
                new.update(win_kp=torch.zeros(B, H, self.window, K, dtype=dtype, device=device),
                           win_gs=torch.zeros(B, H, self.window, K, dtype=dtype, device=device))
        if self.windowed and self.sinks > 0:
            new.update(sink_k=torch.zeros(B, H, self.sinks, K, dtype=dtype, device=device),
                       sink_v=torch.zeros(B, H, self.sinks, V, dtype=dtype, device=device),
                       sink_pos=torch.full((B, self.sinks), -1, dtype=torch.long, device=device))
        self._bind(new)
        self._host_length, self._fresh = 0, True
        return self

    def prepare(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Allocate at the first call (shapes, dtype and device from this call's keys ``k`` and values ``v``)."""
        if self.seen is None:
            B, H, _, K = k.shape
            self.allocate(B, H, K, v.shape[-1], k.dtype, k.device)

    def _bind(self, new: dict) -> None:
        for name, t in new.items():
            # a fixed data pointer: compiled graphs and CUDA graphs may treat the buffer as static (as HF's
            # StaticLayer does; not possible while tracing, so a compiled prefill leaves them unmarked)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(t)
            setattr(self, name, t)

    # ---------------------------------------------------------------------------------------- ligerfx API
    def initial_state(self) -> Optional[torch.Tensor]:
        """The GLA state this call starts from: None before the first token, a copy while autograd records (the
        buffer is overwritten in place afterwards), else the buffer itself."""
        if self.state is None or self._fresh:
            return None
        return self.state.clone() if torch.is_grad_enabled() else self.state

    def update_state(self, state: torch.Tensor) -> None:
        """The GLA state after this call, written in place."""
        with torch.no_grad():
            self.state.copy_(state)

    def window_keys(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Keys/values/positions the window branch attends over: sinks, the ring, then the new tokens."""
        ks, vs, ps = [], [], []
        if self.sink_k is not None:
            ks.append(self.sink_k), vs.append(self.sink_v), ps.append(self.sink_pos)
        if self.win_k is not None:
            # oldest first: the window kernels skip key blocks by position range, so valid key positions must be
            # non-decreasing (slot seen % window holds the oldest token)
            B, H, W, _ = self.win_k.shape
            order = self._ring_order()
            wk, wv = self._gather_ring(self.win_k, order), self._gather_ring(self.win_v, order)
            wp = self.win_pos.gather(1, order)
            if self.sinks:  # tokens already in the sink slots must not be counted twice
                wp = wp.masked_fill(wp < self.sinks, -1)
            ks.append(wk), vs.append(wv), ps.append(wp)
        if not ks:
            return k, v, pos
        ks.append(k.to(ks[0].dtype)), vs.append(v.to(vs[0].dtype)), ps.append(pos)
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ps, 1)

    def history(self):
        """The ring oldest-first for ``variant="complementary"``: pre-RoPE keys, values, gate inputs
        (``[B, HKV, window, ·]``) and positions (``[B, window]``, ``-1`` = empty). These tokens are in the window,
        not yet in the state."""
        order = self._ring_order()
        return (self._gather_ring(self.win_kp, order), self._gather_ring(self.win_v, order),
                self._gather_ring(self.win_gs, order), self.win_pos.gather(1, order))

    def _ring_order(self) -> torch.Tensor:
        W = self.win_pos.shape[1]
        return (self.seen[:, None] + torch.arange(W, device=self.seen.device)) % W  # [B, W], oldest first

    @staticmethod
    def _gather_ring(buf: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        B, H, W, D = buf.shape
        return buf.gather(2, order[:, None, :, None].expand(B, H, W, D))

    def advance(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, extra=None) -> None:
        """Account for T new tokens (positions ``pos`` ``[B, T]``, ``-1`` = padding): ring, sinks and counters, in
        place. Only the last ``window`` valid tokens of a sequence can reach the ring. ``extra``: the tokens'
        ``(pre-RoPE keys, gate inputs)`` for the complementary ring."""
        T = k.shape[2]
        valid = pos >= 0
        if self.complementary and extra is None:
            raise ValueError("LigerLayer.advance: a complementary ring needs extra=(k_pre, gate_src)")
        with torch.no_grad():
            if self.win_k is not None:
                pairs = [(self.win_k, k), (self.win_v, v)]
                if self.complementary:
                    pairs += [(self.win_kp, extra[0]), (self.win_gs, extra[1])]
                if T == 1:
                    self._write_one(pairs, pos, valid[:, 0])
                else:
                    self._write_slots(pairs, self.win_pos, valid,
                                      _ring_positions(self.seen + valid.sum(1), self.window))
            if self.sink_k is not None:
                slots = torch.arange(self.sinks, device=pos.device).expand(pos.shape[0], self.sinks)
                self._write_slots([(self.sink_k, k), (self.sink_v, v)], self.sink_pos, valid, slots)
        self.count(valid.sum(1), T)

    def count(self, n_valid: torch.Tensor, T: int) -> None:
        """The counters after a call of ``T`` tokens, ``n_valid`` ``[B]`` of them valid: ``seen`` and ``length`` in
        place, the host copy of the length, and "no longer fresh". ``advance`` ends with it; the fused decode step
        (``liger.decode_step``), which writes ring, sinks and state itself, calls it directly."""
        with torch.no_grad():
            self.seen.add_(n_valid)
            self.length.add_(T)
        self._fresh = False
        if self._softmax_layers():
            # a softmax layer's keys grow, so compiled steps are dynamic anyway: keep the host count exact
            self._host_length = self.cumulative_length + T
        elif torch.compiler.is_compiling() or _capturing(self.length):
            self._host_length = None  # replays do not run this line: read the device counter back when needed
        elif self._host_length is not None:
            self._host_length += T

    def _write_one(self, pairs, pos, valid):
        """Decode step: token ``p`` into slot ``p % window`` (a padded token rewrites the slot's old contents).
        ``pairs``: (ring buffer, this token's tensor) for each ring of the layer."""
        B, H = pairs[0][1].shape[:2]
        slot = (self.seen % self.window)[:, None]  # [B, 1]: a valid token's position is ``seen``
        keep = ~valid[:, None]
        for buf, new in pairs:
            idx = slot[:, None, :, None].expand(B, H, 1, buf.shape[-1])
            buf.scatter_(2, idx, torch.where(keep[:, None, :, None], buf.gather(2, idx), new.to(buf.dtype)))
        self.win_pos.scatter_(1, slot, torch.where(keep, self.win_pos.gather(1, slot), pos))

    def _write_slots(self, pairs, buf_pos, valid, want):
        """Slot ``s`` of a sequence gets the new token at position ``want[b, s]`` when that token is in this call;
        other slots keep their contents. Static shapes for any T (prefill longer than the ring included).
        ``pairs``: (buffer, this call's tokens) for each buffer written at these slots."""
        k = pairs[0][1]
        B, H, T, _ = k.shape
        rank = want - self.seen[:, None]  # [B, S] index of the wanted token among this call's valid tokens
        take = (rank >= 0) & (rank < valid.sum(1, keepdim=True)) & (want >= 0)
        # token index of the r-th valid token: scatter t to its rank (padding goes to the spare column T)
        r_of_t = torch.where(valid, valid.long().cumsum(1) - 1, T)
        t_of_r = torch.zeros(B, T + 1, dtype=torch.long, device=k.device)
        t_of_r.scatter_(1, r_of_t, torch.arange(T, device=k.device).expand(B, T))
        t = t_of_r.gather(1, rank.clamp(0, T))  # [B, S]
        for buf, new in pairs:
            idx = t[:, None, :, None].expand(B, H, t.shape[1], buf.shape[-1])
            buf.copy_(torch.where(take[:, None, :, None], new.to(buf.dtype).gather(2, idx), buf))
        buf_pos.copy_(torch.where(take, want, buf_pos))

    def tensors(self):
        return [t for t in (getattr(self, n) for n in _BUFFERS) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def cumulative_length(self) -> int:
        """Tokens fed so far, padding included, as a Python int (HF's sequence length)."""
        if self.length is None:
            return 0
        if self._host_length is None:  # after compiled or CUDA-graph steps: one host sync
            self._host_length = int(self.length)
        return self._host_length

    # ------------------------------------------------------------------------------------------ HF layer protocol
    @property
    def keys(self):
        return self.win_k

    @keys.setter
    def keys(self, value):  # set by CacheLayerMixin.__init__; the ring is the source of truth
        pass

    @property
    def values(self):
        return self.win_v

    @values.setter
    def values(self, value):
        pass

    @property
    def is_initialized(self):
        return self.seen is not None

    @is_initialized.setter
    def is_initialized(self, value):
        pass

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a ligerfx-linearized layer does not keep a softmax KV cache; its attention forward "
                           "updates the LigerLayer directly")

    def _softmax_layers(self) -> list:
        """The layers of the same cache that are still softmax attention (a hybrid model)."""
        return [layer for layer in self._layers or ()
                if isinstance(layer, CacheLayerMixin) and not isinstance(layer, LigerLayer)]

    def get_mask_sizes(self, query_length: int):
        softmax = self._softmax_layers()
        for layer in softmax:  # that layer needs its own sizes; the new tokens are the last columns either way
            if bool(getattr(layer, "is_sliding", False)) == self.is_sliding:
                return layer.get_mask_sizes(query_length)
        if self.length is None:
            return query_length, 0
        if not softmax and (torch.compiler.is_compiling() or _capturing(self.length)):
            return query_length, self.length  # no host int in a static graph
        return query_length, self.cumulative_length

    def get_seq_length(self):
        """Tokens fed so far: the device counter (a 0-d tensor, as HF's ``StaticLayer``), 0 before the first call."""
        return self.length if self.length is not None else 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn):
        """Batch-size-changing edits (not part of a decode step): new buffers, allocated once more."""
        new = {n: fn(getattr(self, n)) for n in _PER_SEQUENCE if getattr(self, n) is not None}
        self._bind(new)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        with torch.no_grad():
            for name in _PER_SEQUENCE:
                t = getattr(self, name)
                if t is not None:
                    t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        """Back to an empty sequence, keeping the buffers (and their addresses)."""
        with torch.no_grad():
            for name in _BUFFERS:
                t = getattr(self, name)
                if t is not None:
                    t.fill_(-1 if name.endswith("_pos") else 0)
        self._host_length, self._fresh = 0, True

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ligerfx: a recurrent state cannot be rolled back, so cache cropping (assisted/speculative decoding, "
            "prompt lookup) is not supported on a linearized model")

    def offload(self):
        pass

    def prefetch(self):
        pass


def _ring_positions(seen_after: torch.Tensor, window: int) -> torch.Tensor:
    """[B, window]: the position each ring slot holds once ``seen_after`` tokens were seen (the latest
    ``p < seen_after`` with ``p % window == slot``; negative while the ring is not full)."""
    s = torch.arange(window, device=seen_after.device)
    last = seen_after[:, None] - 1
    return last - torch.remainder(last - s, window)


def liger_layer(cache: Cache, layer_idx: int, config) -> LigerLayer:
    """The ``LigerLayer`` at ``layer_idx`` of an HF cache, replacing a fresh layer HF put there.
    ``config`` is the layer's ``LigerConfig``."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, LigerLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise RuntimeError(f"ligerfx: cache layer {layer_idx} already holds softmax keys/values "
                           f"({type(layer).__name__}); a recurrent state cannot be rebuilt from them")
    new = LigerLayer(config.window, config.n_sinks, is_sliding=getattr(layer, "is_sliding", False),
                     sliding_window=getattr(layer, "sliding_window", None),
                     recurrent=config.recurrent_weight > 0, windowed=config.recurrent_weight < 1,
                     complementary=config.variant == "complementary")
    new._layers = layers
    layers[layer_idx] = new
    return new


def new_cache(model, batch_size: int, dtype: Optional[torch.dtype] = None, device=None) -> Cache:
    """An HF ``DynamicCache`` for a ligerfx-transformed ``model`` whose Liger layers are allocated up front, so
    that prefill and decode (compiled, or captured in CUDA graphs) all write into the same buffers."""
    from transformers import DynamicCache

    p = next(model.parameters())
    dtype, device = dtype or p.dtype, device or p.device
    cache = DynamicCache(config=model.config)
    for m in model.modules():
        lin = getattr(m, "_ligerfx", None)
        if lin is None or lin.info is None:
            continue
        layer = liger_layer(cache, lin.layer_idx, lin.config)
        layer.allocate(batch_size, lin.info.n_kv_heads, lin.info.head_dim, dtype=dtype, device=device)
    return cache


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: Liger layers, softmax KV layers and linear-attention states alike."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, LigerLayer):
            total += layer.nbytes()
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        for name in ("recurrent_states", "conv_states"):
            d = getattr(layer, name, None)
            for t in (d.values() if isinstance(d, dict) else []):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total
