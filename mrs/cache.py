"""Per-slot decoding state as explicit pytrees.

Every leaf has the slot (batch row) axis first, so the engine can take, reset or
replace slots with one ``tree_map`` whatever the architecture: a KV cache for
attention models, conv + SSM state for Mamba. Every step returns the cache and the
engine donates it to the next, so XLA updates it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


def zeros(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """A zero array on the default device. On CPU it is filled on the host and copied: the
    eager ``jnp.zeros`` compiles a broadcast for every new shape (11 of them, 0.2 s, for a
    fresh process's first cache), which is most of a warm one-shot run's cache set-up."""
    device = jax.config.jax_default_device
    if isinstance(device, jax.Device) and device.platform == "cpu":
        return jax.device_put(np.zeros(shape, dtype), device, may_alias=False)
    return jnp.zeros(shape, dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """keys: one [slots, kv_heads, max_len, head_dim] array per layer; values: one
    [slots, kv_heads, head_dim, max_len] array per layer (time last, the layout the
    probs @ values contraction reads without a transposed copy); lengths: [slots]."""

    # Logical axis names of each leaf (the sharding rules map them onto a mesh).
    AXES: ClassVar[dict[str, tuple[str, ...]]] = {"keys": ("slots", "kv_heads", "seq", "head_dim"),
                                                  "values": ("slots", "kv_heads", "head_dim", "seq"),
                                                  "lengths": ("slots",)}

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array

    @classmethod
    def init(cls, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
             dtype: jnp.dtype) -> KVCache:
        return cls(keys=tuple(zeros((slots, kv_heads, max_len, head_dim), dtype) for _ in range(layers)),
                   values=tuple(zeros((slots, kv_heads, head_dim, max_len), dtype) for _ in range(layers)),
                   lengths=zeros((slots,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def with_layer(self, index: int, keys: jax.Array, values: jax.Array) -> KVCache:
        return KVCache(keys=self.keys[:index] + (keys,) + self.keys[index + 1:],
                       values=self.values[:index] + (values,) + self.values[index + 1:],
                       lengths=self.lengths)


def write_positions(cache_layer: jax.Array, new: jax.Array, positions: jax.Array, *,
                    time_last: bool = False) -> jax.Array:
    """Scatter new [B, T, K, H] entries into a [B, K, S, H] layer (or [B, K, H, S] with
    ``time_last``) at per-row positions [B, T].

    Positions < 0 (padding) or >= S are dropped, so padding never reaches the cache
    and a row can never overwrite another position by clamping.
    """
    slots, max_len = cache_layer.shape[0], cache_layer.shape[3 if time_last else 2]
    if max_len == 0:        # a cache with no room (a training forward) keeps nothing
        return cache_layer
    index = jnp.where(positions < 0, max_len, positions)                     # [B, T]
    rows = jnp.broadcast_to(jnp.arange(slots)[:, None], index.shape)          # [B, T]
    new = new.astype(cache_layer.dtype)
    if time_last:
        return cache_layer.at[rows, :, :, index].set(new, mode="drop")
    return cache_layer.at[rows, :, index, :].set(new, mode="drop")


def advance(lengths: jax.Array, positions: jax.Array) -> jax.Array:
    """New per-row lengths after a step that wrote ``positions`` ([B, T], -1 = padding)."""
    return jnp.maximum(lengths, jnp.max(positions, axis=1) + 1).astype(jnp.int32)


def take_slots(cache, slots: jax.Array):
    """The sub-cache of the given slot indices (any cache pytree)."""
    return jax.tree_util.tree_map(lambda x: x[slots], cache)


def put_slots(cache, slots: jax.Array, sub):
    """Write a sub-cache back into the given slots (any cache pytree)."""
    return jax.tree_util.tree_map(lambda x, y: x.at[slots].set(y), cache, sub)


def reset_slots(cache, mask: jax.Array):
    """Zero the lengths (and thereby the visible state) of slots where mask [B] is true."""
    return jax.tree_util.tree_map(
        lambda x: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x), cache)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SSMCache:
    """State-space (Mamba) state per slot; its size does not depend on the sequence length.

    conv: one [slots, conv_kernel - 1, channels] array per layer (the last inputs of
    the causal convolution); ssm: one [slots, channels, state_size] float32 array per
    layer (the recurrent state); lengths: [slots] tokens seen. A step whose row starts
    at position 0 starts that row from zero state, as a KV row is overwritten from 0.
    """

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {"conv": ("slots", "conv", "inner"),
                                                  "ssm": ("slots", "inner", "state"),
                                                  "lengths": ("slots",)}

    conv: tuple[jax.Array, ...]
    ssm: tuple[jax.Array, ...]
    lengths: jax.Array
    max_len: int = field(default=1 << 30, metadata={"static": True})   # what the engine planned for

    @classmethod
    def init(cls, layers: int, slots: int, conv_kernel: int, channels: int, state_size: int,
             dtype: jnp.dtype, max_len: int = 1 << 30) -> SSMCache:
        """Zero state. ``max_len`` only records how many positions the caller planned
        for (the engine sizes its token-history buffers by it); the state never grows."""
        return cls(conv=tuple(zeros((slots, conv_kernel - 1, channels), dtype) for _ in range(layers)),
                   ssm=tuple(zeros((slots, channels, state_size), jnp.float32) for _ in range(layers)),
                   lengths=zeros((slots,), jnp.int32), max_len=int(max_len))

