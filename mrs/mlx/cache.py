"""Per-slot decoding state for the MLX backend, with mrs/cache.py's slot contract.

Every array has the slot (batch row) axis first. Lengths live on the host (numpy): in
MLX nothing is traced, so the positions of the next step, the masks and the rotary
tables are computed from them without waiting on the device.

A step replaces the arrays in the cache it was given and returns that cache: the
engine never reads a cache after passing it to a step (the JAX backend donates it),
and dropping the last reference to an old array before it is evaluated lets MLX
write the new one into its buffer instead of copying the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np


@dataclass
class KVCache:
    """keys, values: one [slots, kv_heads, max_len + 1, head_dim] array per layer (the
    last position is the padding sink, see ``mrs.mlx.layers.StepPositions``);
    lengths: [slots] int32 on the host."""

    keys: list[mx.array]
    values: list[mx.array]
    lengths: np.ndarray
    max_len: int

    @classmethod
    def init(cls, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: Any) -> KVCache:
        shape = (slots, kv_heads, max_len + 1, head_dim)
        return cls([mx.zeros(shape, dtype) for _ in range(layers)], [mx.zeros(shape, dtype) for _ in range(layers)],
                   np.zeros((slots,), np.int32), int(max_len))

    def arrays(self) -> list[mx.array]:
        return [*self.keys, *self.values]


@dataclass
class SSMCache:
    """Mamba state per slot: conv [slots, conv_kernel - 1, inner] and ssm [slots, inner,
    state] float32 per layer, lengths [slots] on the host; ``max_len`` only records what
    the engine planned for (the state never grows)."""

    conv: list[mx.array]
    ssm: list[mx.array]
    lengths: np.ndarray
    max_len: int

    @classmethod
    def init(cls, layers: int, slots: int, conv_kernel: int, channels: int, state_size: int, dtype: Any,
             max_len: int) -> SSMCache:
        return cls([mx.zeros((slots, conv_kernel - 1, channels), dtype) for _ in range(layers)],
                   [mx.zeros((slots, channels, state_size), mx.float32) for _ in range(layers)],
                   np.zeros((slots,), np.int32), int(max_len))

    def arrays(self) -> list[mx.array]:
        return [*self.conv, *self.ssm]


Cache = KVCache | SSMCache


def advance(lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """New per-row lengths after a step that wrote ``positions`` ([B, T], -1 = padding)."""
    return np.maximum(lengths, positions.max(axis=1) + 1).astype(np.int32)


def _fields(cache: Cache) -> tuple[str, str]:
    return ("keys", "values") if isinstance(cache, KVCache) else ("conv", "ssm")


def take_slot(cache: Cache, slot: int, start: int) -> Cache:
    """The one-slot cache of ``slot``, cut back to ``start`` positions: a request continues
    from there (0 starts afresh: attention never sees past a query's own position, and
    a Mamba row that starts at 0 starts from zero state, so nothing needs clearing)."""
    first, second = _fields(cache)
    rows = {name: [a[slot:slot + 1] for a in getattr(cache, name)] for name in (first, second)}
    return type(cache)(rows[first], rows[second], np.full((1,), start, np.int32), cache.max_len)


def put_slot(cache: Cache, slot: int, sub: Cache) -> Cache:
    """Write a one-slot cache into ``slot`` of ``cache`` (in place; returns it)."""
    for name in _fields(cache):
        layers = getattr(cache, name)
        for whole, part in zip(layers, getattr(sub, name), strict=True):
            whole[slot:slot + 1] = part.astype(whole.dtype)     # an update MLX may do in the layer's buffer
    lengths = cache.lengths.copy()
    lengths[slot] = sub.lengths[0]
    cache.lengths = lengths
    return cache
