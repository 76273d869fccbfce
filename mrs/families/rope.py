"""Rotary position embedding settings, read from either HF config dialect.

The numbers only (frequencies in numpy); each backend's layers turn them into cos/sin
tables for the positions of a step (``mrs.archs.layers.rope_cos_sin`` for JAX).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mrs.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")


@dataclass(frozen=True)
class Rope:
    """Rotary embedding settings, from either HF config dialect (see ``from_hf``)."""

    kind: str
    theta: float
    rotary_dim: int
    max_position: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    @classmethod
    def from_hf(cls, config: dict, head_dim: int) -> Rope:
        """Read ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
        params = dict(config.get("rope_parameters") or {})
        if isinstance(config.get("rope_scaling"), dict):
            params = {**config["rope_scaling"], **params}
        if set(params) & set(config.get("layer_types") or ()):
            raise UnsupportedModelError("per-layer-type rope_parameters are not supported yet")
        kind = params.get("rope_type", params.get("type", "default"))
        kind = {"su": "longrope"}.get(kind, kind)
        if kind not in ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        max_position = int(config.get("max_position_embeddings", 2048))
        original = int(config.get("original_max_position_embeddings")
                       or params.get("original_max_position_embeddings") or max_position)
        factor = params.get("factor")
        attention_factor = 1.0
        if kind == "longrope":
            factor = max_position / original if factor is None else float(factor)
            attention_factor = params.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        elif kind in ("linear", "dynamic", "llama3") and factor is None:
            raise UnsupportedModelError(f"rope type {kind!r} needs a 'factor'")
        rope = cls(kind=kind, theta=theta, rotary_dim=int(head_dim * partial), max_position=max_position,
                   factor=float(factor or 1.0),
                   low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   original_max_position=original,
                   short_factor=tuple(params.get("short_factor") or ()),
                   long_factor=tuple(params.get("long_factor") or ()),
                   attention_factor=float(attention_factor))
        if kind == "longrope" and not (len(rope.short_factor) == len(rope.long_factor) == rope.rotary_dim // 2):
            raise UnsupportedModelError(f"longrope factors must have {rope.rotary_dim // 2} entries each")
        return rope

    def context_length(self, max_position: int) -> int:
        """Dynamic NTK is made to run past max_position_embeddings, by its factor."""
        return int(max_position * self.factor) if self.kind == "dynamic" else max_position

    def base_inv_freq(self) -> np.ndarray:
        """[rotary_dim/2] float32 frequencies before any length-dependent scaling."""
        exponents = np.arange(0, self.rotary_dim, 2, dtype=np.int64).astype(np.float32) / self.rotary_dim
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.kind == "linear":
            return inv / np.float32(self.factor)
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv
