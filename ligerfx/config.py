"""``LigerConfig``: the one configuration object of a ligerfx transform."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

VARIANTS = ("gla", "swa_sinks", "complementary")
FEATURE_MAPS = ("softmax",)


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
