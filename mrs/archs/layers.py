"""Pieces every architecture shares: linear/embedding/norm params in Hugging Face
layout, rotary embeddings (default, linear, dynamic NTK, llama3, longrope), attention
over the per-slot KV cache, and the gated MLP.

Axis letters (used in einsums and shape comments across mrs):
B batch/slots, T time (this step), S cache length, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F feed-forward dim, V vocab.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs.cache import KVCache, advance, write_positions
from mrs.errors import UnsupportedModelError

MASKED = float(np.finfo(np.float32).min)

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function a HF config names, or a clear error."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# --- parameters in Hugging Face layout, so checkpoint names map 1:1 -----------------

class Linear(nnx.Module):
    """y = x W^T + b with W stored as HF does: [out, in]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: Any):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y + self.bias[...] if self.bias is not None else y


class Embedding(nnx.Module):
    """Token embeddings [V, D]; ``attend`` reuses them as a tied output head."""

    def __init__(self, vocab: int, dim: int, *, dtype: Any):
        self.weight = nnx.Param(jnp.zeros((vocab, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...D,VD->...V", x, self.weight[...])


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim: int, *, eps: float, dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, bias: bool = True):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * self.weight[...]
        return h + self.bias[...] if self.bias is not None else h


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) — Llama's SwiGLU and kin.

    gate and up are one [2F, D] matrix (``gate_up_proj``, gate rows first, as Phi-3
    stores it): at batch 1 a decode step is bound by reading weights, and one large
    matmul reads them faster than two small ones. Checkpoints that keep them apart
    are stacked at load (see ``weights.load_params(fused=...)``).
    """

    def __init__(self, dim: int, hidden: int, *, act: str, bias: bool, dtype: Any):
        self.gate_up_proj = Linear(dim, 2 * hidden, bias=bias, dtype=dtype)
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)                   # [B, T, F] each
        return self.down_proj(self.act(gate) * up)


def split_qkv(qkv: jax.Array, heads: int, kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused projection [B, T, (N + 2K) * H] -> q [B, T, N*H], k, v [B, T, K*H]."""
    return tuple(jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1))


# --- rotary position embeddings ----------------------------------------------------

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

    def inv_freq(self, seq_len: jax.Array) -> jax.Array:
        """[B, rotary_dim/2] frequencies for rows whose longest position is ``seq_len - 1``.

        Dynamic NTK and longrope depend on the length, per row, as transformers
        recomputes them per forward call from the largest position id.
        """
        batch = seq_len.shape[0]
        base = jnp.asarray(self.base_inv_freq())
        if self.kind == "dynamic":
            dim = self.rotary_dim
            length = jnp.maximum(seq_len, self.max_position).astype(jnp.float32)[:, None]
            theta = self.theta * ((self.factor * length / self.max_position) - (self.factor - 1)) ** (dim / (dim - 2))
            exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
            return 1.0 / theta ** exponents[None, :]
        if self.kind == "longrope":
            short = jnp.asarray(self.short_factor, jnp.float32)
            long = jnp.asarray(self.long_factor, jnp.float32)
            ext = jnp.where((seq_len > self.original_max_position)[:, None], long[None], short[None])
            return 1.0 / (ext * (1.0 / base)[None, :])
        return jnp.broadcast_to(base[None, :], (batch, base.shape[0]))

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, T, rotary_dim] (float32) for positions [B, T] (-1 = padding)."""
        seq_len = jnp.max(positions, axis=1) + 1
        freqs = positions.astype(jnp.float32)[:, :, None] * self.inv_freq(seq_len)[:, None, :]
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(angles) * self.attention_factor, jnp.sin(angles) * self.attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim features of x [B, T, N, H] (HF's rotate_half layout)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# --- attention over the cache ------------------------------------------------------

def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    cache_keys: jax.Array, cache_values: jax.Array,
    positions: jax.Array, *, scale: float, window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attend q [B, T, N, H] causally over the layer cache (keys [B, K, S, H], values
    [B, K, H, S]) plus this step's k, v [B, T, K, H], then write k, v into the cache at
    ``positions``. Returns out [B, T, N*H] and the new cache.

    The cache holds a row's earlier positions, all below its first new position; the
    new block is attended directly, so the step reads the cache as it came in and the
    write comes last. XLA then updates the donated cache in place instead of copying
    it to attend over its own write. A query at position p sees s <= p (and s > p -
    window when the layer uses a sliding window).
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads, max_len = cache_keys.shape[1], cache_keys.shape[2]
    q = q.reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)
    p = positions[:, :, None]                                                   # [B, T, 1]
    first = jnp.min(jnp.where(positions < 0, max_len, positions), axis=1)      # [B]
    s = jnp.arange(max_len)[None, None, :]
    seen = s < first[:, None, None]                                             # [B, 1, S]
    new = positions[:, None, :]                                                 # [B, 1, T]
    fresh = (new >= 0) & (new <= p)                                             # [B, T, T]
    if window is not None:
        seen = seen & (s > p - window)
        fresh = fresh & (new > p - window)
    # Scores and mixes keep the order a batched matmul produces ([B, K, T, G, .]), so
    # XLA adds no transposed copies of them (a tenth of a prefill's time otherwise).
    old_scores = _cache_scores(q, cache_keys.astype(q.dtype))                  # [B, K, T, G, S]
    new_scores = jnp.einsum("BTKGH,BUKH->BKTGU", q, k)
    scores = jnp.concatenate([old_scores, new_scores], axis=-1).astype(jnp.float32) * scale
    visible = jnp.concatenate([jnp.broadcast_to(seen, (batch, steps, max_len)), fresh], axis=-1)
    scores = jnp.where(visible[:, None, :, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = (_cache_mix(probs[..., :max_len], cache_values.astype(v.dtype))
           + jnp.einsum("BKTGU,BUKH->BKTGH", probs[..., max_len:], v))          # [B, K, T, G, H]
    cache_keys = write_positions(cache_keys, k, positions)
    cache_values = write_positions(cache_values, v, positions, time_last=True)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, steps, heads * head_dim), cache_keys, cache_values


def _cache_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, T, K, G, H] . keys [B, K, S, H] -> [B, K, T, G, S].

    A decode step (T = 1) takes one matrix-vector product per query group: XLA's CPU
    backend runs those inline, while the [S, G] matrix product it would otherwise form
    goes to a library call whose fixed cost (~50 us) is many times the work, twice per
    layer per step.
    """
    if q.shape[1] > 1:
        return jnp.einsum("BTKGH,BKSH->BKTGS", q, keys)
    groups = [jnp.einsum("BKSH,BKH->BKS", keys, q[:, 0, :, g]) for g in range(q.shape[3])]
    return jnp.stack(groups, axis=2)[:, :, None]


def _cache_mix(probs: jax.Array, values: jax.Array) -> jax.Array:
    """probs [B, K, T, G, S] . values [B, K, H, S] -> [B, K, T, G, H]; per group when T = 1,
    as in ``_cache_scores``."""
    if probs.shape[2] > 1:
        return jnp.einsum("BKTGS,BKHS->BKTGH", probs, values)
    groups = [jnp.einsum("BKHS,BKS->BKH", values, probs[:, :, 0, g]) for g in range(probs.shape[3])]
    return jnp.stack(groups, axis=2)[:, :, None]


def rotary_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
    cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array, *,
    heads: int, kv_heads: int, head_dim: int, scale: float, window: int | None = None,
    q_norm: Any = None, k_norm: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected q [B, T, N*H], k, v [B, T, K*H] -> split heads, optional per-head q/k
    norm, rotary, then ``cached_attention``. The body every rotary family shares."""
    B, T, _ = q.shape
    q = q.reshape(B, T, heads, head_dim)                                     # [B, T, N, H]
    k = k.reshape(B, T, kv_heads, head_dim)                                  # [B, T, K, H]
    v = v.reshape(B, T, kv_heads, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return cached_attention(q, k, v, cache_keys, cache_values, positions, scale=scale, window=window)


def last_valid(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> [B, 1, D] at each row's last non-padding step."""
    index = jnp.argmax(positions, axis=1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)


# --- shared by Phi, Mamba and BERT -------------------------------------------------

@contextmanager
def reading_config():
    """Turn a missing key or a bad value in config.json into an UnsupportedModelError."""
    try:
        yield
    except KeyError as e:
        raise UnsupportedModelError(f"config.json lacks required key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"config.json has an invalid value: {e}") from e


def run_layers(layers, x: jax.Array, positions: jax.Array, cos: jax.Array, sin: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run decoder layers ``layer(x, positions, cos, sin, keys, values) -> (x, keys, values)``
    over a KVCache, one cache layer each; lengths advance past ``positions``."""
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(layers):
        x, keys[i], values[i] = layer(x, positions, cos, sin, keys[i], values[i])
    return x, KVCache(tuple(keys), tuple(values), advance(cache.lengths, positions))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float) -> jax.Array:
    """Attention without a cache (encoders): q [B, T, N, H], k, v [B, S, K, H], mask [B, T, S]
    (True = may attend) -> [B, T, N*H]. Softmax in float32."""
    batch, steps, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(batch, steps, heads * head_dim)
