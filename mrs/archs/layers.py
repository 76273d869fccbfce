"""Pieces every architecture shares: linear/embedding/norm params in Hugging Face
layout, rotary embeddings (default, linear, dynamic NTK, llama3, longrope), attention
over the per-slot KV cache, and the gated MLP.

Axis letters (used in einsums and shape comments across mrs):
B batch/slots, T time (this step), S cache length, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F feed-forward dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs.cache import KVCache, advance, write_positions
from mrs.errors import UnsupportedModelError
from mrs.families.common import ACTIVATIONS as ACTIVATION_NAMES
from mrs.families.rope import Rope

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
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES), "every activation a config may name has an implementation"


def activation(name: str):
    """The activation function a HF config names, or a clear error."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def param(shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...], fill: float = 0.0) -> nnx.Param:
    """A parameter with its logical axis names (``embed``, ``heads``, ``vocab``, ...) as
    metadata: the loader's spec and, later, the sharding rules read them."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not name every dimension of shape {shape}")
    return nnx.Param(jnp.full(shape, fill, dtype), axes=tuple(axes))


# --- parameters in Hugging Face layout, so checkpoint names map 1:1 -----------------

def project(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., D] . weight [*O, D] -> [..., *O]: the dense projection every Linear runs.

    The weight is contracted as the 2-D [prod(O), D] matrix it is in memory (a free
    reshape): given the N-D weight, XLA's CPU backend transposes it into a fresh copy on
    every call, which costs a decode step three times its time.
    """
    out = weight.shape[:-1]
    y = jnp.einsum("...i,oi->...o", x, weight.reshape(-1, weight.shape[-1]))
    return y.reshape(y.shape[:-1] + out)


class Linear(nnx.Module):
    """y = x W^T + b with W stored as HF does, [out, in]; ``out`` may be several axes
    (q/k/v as [K, G + 2, H]), so heads stay an axis a shard or an adapter can slice.

    This is the dense variant; ``swap_linears`` replaces chosen ones (by parameter path)
    with quantized, adapted or sharded variants that keep this call signature.
    """

    def __init__(self, in_features: int, out: int | tuple[int, ...], *, bias: bool, dtype: Any,
                 axes: tuple[str, ...]):
        out = (out,) if isinstance(out, int) else tuple(out)
        self.weight = param(out + (in_features,), dtype, axes)
        self.bias = param(out, dtype, axes[:-1]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(x, self.weight[...])
        return y + self.bias[...] if self.bias is not None else y


class Embedding(nnx.Module):
    """Token embeddings [V, D]; ``attend`` reuses them as a tied output head (so a
    variant of the embedding covers the tied head too)."""

    def __init__(self, vocab: int, dim: int, *, dtype: Any, axes: tuple[str, str] = ("vocab", "embed")):
        self.weight = param((vocab, dim), dtype, axes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return project(x, self.weight[...])


Projection = Linear | Embedding

# The module types swap_linears offers to a variant: the dense ones here, plus the variants
# that other modules register (quantized, LoRA-adapted), so one can wrap another.
_PROJECTIONS: list[type] = [Linear, Embedding]


def register_projection(cls: type) -> type:
    """Mark a projection variant (a class decorator) so ``swap_linears`` sees its instances."""
    _PROJECTIONS.append(cls)
    return cls


def swap_linears(model: nnx.Module, variant: Callable[[str, Projection], nnx.Module | None]) -> list[str]:
    """Replace projections in place, the way mlx-lm's ``nn.quantize`` picks layers:
    ``variant(path, layer)`` sees every Linear and Embedding (and registered variant
    of them, such as a quantized Linear) with its parameter path
    (``model.layers.0.self_attn.qkv_proj``) and returns a replacement, or None to keep
    it. Returns the paths replaced. The one place quantized, LoRA-adapted and sharded
    projections plug in."""
    replaced: list[str] = []

    def visit(node: Any, prefix: str) -> None:
        children = list(enumerate(node)) if isinstance(node, nnx.List) else list(vars(node).items())
        for key, child in children:
            if not isinstance(child, nnx.Module):
                continue
            path = f"{prefix}{key}"
            if isinstance(child, tuple(_PROJECTIONS)):
                new = variant(path, child)
                if new is not None:
                    if isinstance(node, nnx.List):
                        node[key] = new
                    else:
                        setattr(node, key, new)
                    replaced.append(path)
                    continue
            visit(child, path + ".")

    visit(model, "")
    return replaced


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, axis: str = "embed"):
        self.weight = param((dim,), dtype, (axis,), fill=1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, bias: bool = True, axis: str = "embed"):
        self.weight = param((dim,), dtype, (axis,), fill=1.0)
        self.bias = param((dim,), dtype, (axis,)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * self.weight[...]
        return h + self.bias[...] if self.bias is not None else h


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) — Llama's SwiGLU and kin.

    gate and up are one [2, F, D] tensor (``gate_up_proj``, gate first): at batch 1 a
    decode step is bound by reading weights, and one large matmul reads them faster
    than two small ones; the parts axis keeps F whole for a shard or an adapter.
    Checkpoints that keep them apart are stacked at load (``weights.Fused``).
    """

    def __init__(self, dim: int, hidden: int, *, act: str, bias: bool, dtype: Any):
        self.gate_up_proj = Linear(dim, (2, hidden), bias=bias, dtype=dtype, axes=("gate_up", "mlp", "embed"))
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype, axes=("embed", "mlp"))
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)                                            # [B, T, 2, F]
        return self.down_proj(self.act(gate_up[..., 0, :]) * gate_up[..., 1, :])


def qkv_projection(dim: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool, dtype: Any) -> Linear:
    """The fused q/k/v projection, [K, G + 2, H, D] (see ``mrs.families.llama.qkv_fused``)."""
    return Linear(dim, (kv_heads, heads // kv_heads + 2, head_dim), bias=bias, dtype=dtype,
                  axes=("kv_heads", "qkv", "head_dim", "embed"))


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused projection [B, T, K, G + 2, H] -> q [B, T, N, H], k, v [B, T, K, H]."""
    B, T, K, parts, H = qkv.shape
    G = parts - 2
    return qkv[:, :, :, :G].reshape(B, T, K * G, H), qkv[:, :, :, G], qkv[:, :, :, G + 1]


# --- rotary position embeddings ----------------------------------------------------

def rope_inv_freq(rope: Rope, seq_len: jax.Array) -> jax.Array:
    """[B, rotary_dim/2] frequencies for rows whose longest position is ``seq_len - 1``.

    Dynamic NTK and longrope depend on the length, per row, as transformers
    recomputes them per forward call from the largest position id.
    """
    batch = seq_len.shape[0]
    base = jnp.asarray(rope.base_inv_freq())
    if rope.kind == "dynamic":
        dim = rope.rotary_dim
        length = jnp.maximum(seq_len, rope.max_position).astype(jnp.float32)[:, None]
        theta = rope.theta * ((rope.factor * length / rope.max_position) - (rope.factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / theta ** exponents[None, :]
    if rope.kind == "longrope":
        short = jnp.asarray(rope.short_factor, jnp.float32)
        long = jnp.asarray(rope.long_factor, jnp.float32)
        ext = jnp.where((seq_len > rope.original_max_position)[:, None], long[None], short[None])
        return 1.0 / (ext * (1.0 / base)[None, :])
    return jnp.broadcast_to(base[None, :], (batch, base.shape[0]))


def rope_cos_sin(rope: Rope, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] (float32) for positions [B, T] (-1 = padding)."""
    seq_len = jnp.max(positions, axis=1) + 1
    freqs = positions.astype(jnp.float32)[:, :, None] * rope_inv_freq(rope, seq_len)[:, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor


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
    positions: jax.Array, *, scale: float, window: int | None = None, softcap: float | None = None,
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
    if softcap is not None:   # Gemma 2: scores squashed into (-cap, cap) before the mask
        scores = jnp.tanh(scores / softcap) * softcap
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
    scale: float, window: int | None = None, q_norm: Any = None, k_norm: Any = None, softcap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k, v [B, T, K, H] -> optional per-head q/k norm, rotary, then
    ``cached_attention``. The body every rotary family shares."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return cached_attention(q, k, v, cache_keys, cache_values, positions, scale=scale, window=window,
                            softcap=softcap)


def heads(x: jax.Array, count: int) -> jax.Array:
    """[B, T, count * H] -> [B, T, count, H]."""
    return x.reshape(x.shape[:2] + (count, x.shape[-1] // count))


def last_valid(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> [B, 1, D] at each row's last non-padding step."""
    index = jnp.argmax(positions, axis=1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)


# --- shared by Phi, Mamba and BERT -------------------------------------------------

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
