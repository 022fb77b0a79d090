"""``LigerConfig``: the one configuration object of a ligerfx transform."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

VARIANTS = ("gla", "swa_sinks", "complementary")
FEATURE_MAPS = ("softmax",)


def sink_position(text: str):
    """Parse a ``--sink-position`` flag: an int or ``"absolute"`` (argparse reports the ValueError)."""
    if str(text).strip().lower() == "absolute":
        return "absolute"
    return int(text)


@dataclass(frozen=True)
class LigerConfig:
    """How attention is linearized.

    Args:
        window (int): previous tokens each query sees in the softmax window branch, besides itself. The official
            Liger code attends to itself plus 64 previous keys (65 in all); ``window=64`` reproduces that.
        mix (float): weight of the recurrent (GLA) branch; the window branch gets ``1 - mix``. ``1.0`` is pure GLA.
            Not used by ``"complementary"`` (its split is the shared normaliser's; ``mix`` must stay 0.5 there).
        gate_normalizer (float): ``log a_t = logsigmoid(k_t) / gate_normalizer``.
        feature_map (str): feature map of the recurrent branch, over the head dimension: ``"softmax"``.
        variant (str): ``"gla"`` (Liger attention), ``"swa_sinks"`` (training-free window + attention sinks,
            no recurrence; a baseline) or ``"complementary"`` (window + sinks softmax over the recent tokens, GLA
            only over the tokens that left the window, one shared normaliser; see ``ligerfx/liger.py``).
        sinks (int): attention-sink tokens always visible to the window branch (``None``: 0 for ``"gla"``, 4 for
            ``"swa_sinks"`` and ``"complementary"``).
        sink_position (int, "absolute" or None): once a query is past this position, it scores the attention sinks
            outside its window as if it stood at this position (RoPE'd there), so a sink is never seen farther back
            than the model was trained to look (after StreamingLLM, which scores sinks by their place in the cache).
            ``None`` (default): the model's shortest attention span minus one (``sliding_window - 1`` for models
            with sliding-window layers such as Gemma 3, else ``max_position_embeddings - 1``; "absolute" when the
            config has neither); ``"absolute"``: sinks at their true distance. Only matters with ``sinks > 0`` and
            RoPE; resolved by ``transform`` and stored resolved in ``model.config.ligerfx``.
        layers (sequence of int, optional): decoder-layer indices to linearize; ``None`` = every attention layer.
        only_full_attention (bool): for models with sliding-window layers (Gemma 3), linearize only the
            full-attention layers and keep the sliding ones as they are.
        lora (dict, optional): LoRA settings for the ``"lora"`` pass.
    """

    window: int = 64
    mix: float = 0.5
    gate_normalizer: float = 16.0
    feature_map: str = "softmax"
    variant: str = "gla"
    sinks: Optional[int] = None
    sink_position: Optional[Union[int, str]] = None
    layers: Optional[Sequence[int]] = None
    only_full_attention: bool = False
    lora: Optional[dict] = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"LigerConfig.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"LigerConfig.feature_map={self.feature_map!r}: expected one of {FEATURE_MAPS}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"LigerConfig.mix={self.mix}: must lie in [0, 1]")
        if self.variant == "complementary" and self.mix != 0.5:
            raise ValueError(f"LigerConfig.mix={self.mix}: variant='complementary' does not use mix (the shared "
                             "normaliser splits window and state); leave it at 0.5")
        if self.window < 0:
            raise ValueError(f"LigerConfig.window={self.window}: must be >= 0")
        if self.gate_normalizer <= 0:
            raise ValueError(f"LigerConfig.gate_normalizer={self.gate_normalizer}: must be > 0")
        if self.sinks is not None and self.sinks < 0:
            raise ValueError(f"LigerConfig.sinks={self.sinks}: must be >= 0")
        if self.sink_position is not None and self.sink_position != "absolute":
            if isinstance(self.sink_position, bool) or not isinstance(self.sink_position, int):
                raise ValueError(f"LigerConfig.sink_position={self.sink_position!r}: expected an int, 'absolute' "
                                 "or None")
            if self.sink_position < self.window + self.n_sinks:
                raise ValueError(f"LigerConfig.sink_position={self.sink_position}: must be >= window + sinks "
                                 f"({self.window + self.n_sinks}), where the sinks leave the window")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def n_sinks(self) -> int:
        if self.sinks is not None:
            return self.sinks
        return 0 if self.variant == "gla" else 4

    @property
    def recurrent_weight(self) -> float:
        """Weight of the GLA branch (0 for the window-only variant)."""
        return 0.0 if self.variant == "swa_sinks" else self.mix

    def resolve_sink_position(self, model_config=None) -> Optional[int]:
        """The position past which sinks are scored from (``None``: true distances, i.e. ``"absolute"``, no
        sinks, or a model config without a known span). See ``sink_position``."""
        if self.n_sinks == 0 or self.sink_position == "absolute":
            return None
        if self.sink_position is not None:
            return int(self.sink_position)
        spans = []
        if model_config is not None:
            cfg = getattr(model_config, "get_text_config", lambda: model_config)()
            for name in ("sliding_window", "max_position_embeddings"):
                if name == "sliding_window" and getattr(cfg, "use_sliding_window", True) is False:
                    continue  # e.g. Qwen2: a window in the config that no layer uses
                v = getattr(cfg, name, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    spans.append(v)
        if not spans:
            return None
        return max(min(spans) - 1, self.window + self.n_sinks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LigerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"passes", "version"}
        if unknown:
            raise ValueError(f"config.ligerfx has unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})
