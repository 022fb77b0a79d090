"""Constant-size decode state of a linearized layer, living inside Hugging Face's ``Cache``.

A ``LigerLayer`` replaces the KV-cache layer HF created for a linearized attention layer (in place in
``cache.layers``), so stock ``model.generate()`` works unchanged. Per sequence it holds:

* the GLA state, fp32, ``[B, HKV, K, V]`` — once per KV head;
* a fixed ring of the last ``window`` RoPE'd keys/values ``[B, HKV, window, D]`` in the model dtype, with their
  positions (``-1`` = empty or padding), and ``sinks`` sink slots for the window+sinks variant;
* the count of valid tokens seen (positions continue across calls, left padding included).

None of these grow with the number of tokens. For the attention mask HF builds before each step, the layer reports
the sizes the layer it replaced would have reported, so layers left as softmax attention keep a correct mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class LigerLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, window: int, sinks: int = 0, is_sliding: bool = False, sliding_window: Optional[int] = None):
        super().__init__()
        self.window, self.sinks = int(window), int(sinks)
        self.is_sliding, self.sliding_window = bool(is_sliding), sliding_window
        self.cumulative_length = 0
        self.state: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # [B] valid tokens so far
        self.win_k = self.win_v = self.win_pos = None
        self.sink_k = self.sink_v = self.sink_pos = None

    # ---------------------------------------------------------------------------------------------- ligerfx API
    def window_keys(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Keys/values/positions the window branch attends over: sinks, the ring, then the new tokens."""
        ks, vs, ps = [], [], []
        if self.sink_k is not None:
            ks.append(self.sink_k), vs.append(self.sink_v), ps.append(self.sink_pos)
        if self.win_k is not None:
            wp = self.win_pos
            if self.sinks:  # tokens already in the sink slots must not be counted twice
                wp = wp.masked_fill(wp < self.sinks, -1)
            ks.append(self.win_k), vs.append(self.win_v), ps.append(wp)
        ks.append(k), vs.append(v), ps.append(pos)
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ps, 1)

    def advance(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep_window: bool = True):
        """Account for T new tokens (positions ``pos``, ``-1`` = padding) and keep the last ``window`` of them."""
        B, H, T, D = k.shape
        self.cumulative_length += T
        self.seen = (self.seen if self.seen is not None else pos.new_zeros(B)) + (pos >= 0).sum(1)
        if not keep_window or self.window == 0:
            return
        if self.win_k is None:
            W = self.window
            self.win_k = k.new_zeros(B, H, W, D)
            self.win_v = v.new_zeros(B, H, W, v.shape[-1])
            self.win_pos = pos.new_full((B, W), -1)
            if self.sinks:
                self.sink_k = k.new_zeros(B, H, self.sinks, D)
                self.sink_v = v.new_zeros(B, H, self.sinks, v.shape[-1])
                self.sink_pos = pos.new_full((B, self.sinks), -1)
        if self.sinks:
            is_sink = (pos >= 0) & (pos < self.sinks)
            if bool(is_sink.any()):
                b, t = is_sink.nonzero(as_tuple=True)
                slot = pos[b, t]
                self.sink_k[b, :, slot] = k[b, :, t]
                self.sink_v[b, :, slot] = v[b, :, t]
                self.sink_pos[b, slot] = pos[b, t]
        W = self.window
        self.win_k = torch.cat([self.win_k, k], 2)[:, :, -W:].contiguous()
        self.win_v = torch.cat([self.win_v, v], 2)[:, :, -W:].contiguous()
        self.win_pos = torch.cat([self.win_pos, pos], 1)[:, -W:].contiguous()

    def tensors(self):
        return [t for t in (self.state, self.seen, self.win_k, self.win_v, self.win_pos, self.sink_k, self.sink_v,
                            self.sink_pos) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

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

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_sliding and self.sliding_window:  # what DynamicSlidingWindowLayer would report
            W = self.sliding_window
            kv_offset = max(self.cumulative_length - W + 1, 0)
            if self.cumulative_length >= W:
                return W - 1 + query_length, kv_offset
            return self.cumulative_length + query_length, kv_offset
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn):
        for name in ("state", "seen", "win_k", "win_v", "win_pos", "sink_k", "sink_v", "sink_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.cumulative_length = 0
        self.state = self.seen = self.win_k = self.win_v = self.win_pos = None
        self.sink_k = self.sink_v = self.sink_pos = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ligerfx: a recurrent state cannot be rolled back, so cache cropping (assisted/speculative decoding, "
            "prompt lookup) is not supported on a linearized model")

    def offload(self):
        pass

    def prefetch(self):
        pass


def liger_layer(cache: Cache, layer_idx: int, window: int, sinks: int) -> LigerLayer:
    """The ``LigerLayer`` at ``layer_idx`` of an HF cache, replacing a fresh layer HF put there."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, LigerLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise RuntimeError(f"ligerfx: cache layer {layer_idx} already holds softmax keys/values "
                           f"({type(layer).__name__}); a recurrent state cannot be rebuilt from them")
    new = LigerLayer(window, sinks, is_sliding=getattr(layer, "is_sliding", False),
                     sliding_window=getattr(layer, "sliding_window", None))
    layers[layer_idx] = new
    return new


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
