"""Pieces every architecture shares, in MLX: the mirror of mrs/archs/layers.py.

Linear/embedding/norm params in Hugging Face layout (fused q/k/v [K, G + 2, H, D] and
gate/up [2, F, D], so the param names, shapes and checkpoint maps are the JAX
backend's), rotary tables (default, linear, dynamic NTK, llama3, longrope), attention
over the per-slot KV cache (mrs/mlx/cache.py), and the gated MLP.

Axis letters as in mrs/archs/layers.py: B batch/slots, T time (this step), S cache
length, D model dim, N query heads, K kv heads, G query heads per kv head, H head dim,
F feed-forward dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mrs.errors import UnsupportedModelError
from mrs.families.common import ACTIVATIONS as ACTIVATION_NAMES
from mrs.families.rope import Rope


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,                       # exact (erf)
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": nn.relu,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES), "every activation a config may name has an implementation"


def activation(name: str) -> Callable[[mx.array], mx.array]:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# --- parameters in Hugging Face layout -----------------------------------------------

def project(x: mx.array, weight: mx.array) -> mx.array:
    """x [..., D] . weight [*O, D] -> [..., *O], contracting the weight as its 2-D matrix."""
    out = weight.shape[:-1]
    y = x @ weight.reshape(-1, weight.shape[-1]).T
    return y.reshape(*y.shape[:-1], *out)


class Linear(nn.Module):
    """y = x W^T + b with W [*out, in] as HF stores it (``out`` may be several axes)."""

    def __init__(self, in_features: int, out: int | tuple[int, ...], *, bias: bool, dtype: Any):
        super().__init__()
        out = (out,) if isinstance(out, int) else tuple(out)
        self.weight = mx.zeros(out + (in_features,), dtype)
        if bias:
            self.bias = mx.zeros(out, dtype)
        self.has_bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = project(x, self.weight)
        return y + self.bias if self.has_bias else y


class Embedding(nn.Module):
    """Token embeddings [V, D]; ``attend`` reuses them as a tied output head."""

    def __init__(self, vocab: int, dim: int, *, dtype: Any):
        super().__init__()
        self.weight = mx.zeros((vocab, dim), dtype)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.weight[tokens]

    def attend(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def swap_linears(model: nn.Module, variant: Callable[[str, Any], nn.Module | None]) -> list[str]:
    """Replace projections in place by parameter path, as ``mrs.archs.layers.swap_linears``
    does for JAX: ``variant(path, layer)`` sees every Linear and Embedding and returns a
    replacement or None. Returns the paths replaced."""
    replaced: list[str] = []

    def visit(node: Any, prefix: str) -> None:
        children = list(enumerate(node)) if isinstance(node, list) else list(node.items())
        for key, child in children:
            if not isinstance(child, (nn.Module, list)):
                continue
            path = f"{prefix}{key}"
            if isinstance(child, (Linear, Embedding)):
                new = variant(path, child)
                if new is not None:
                    node[key] = new
                    replaced.append(path)
                    continue
            visit(child, path + ".")

    visit(model, "")
    return replaced


class RMSNorm(nn.Module):
    """RMSNorm in float32, as transformers does, then cast back and scaled."""

    def __init__(self, dim: int, *, eps: float, dtype: Any):
        super().__init__()
        self.weight = mx.ones((dim,), dtype)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        h = x.astype(mx.float32)
        h = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight * h.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, bias: bool = True):
        super().__init__()
        self.weight = mx.ones((dim,), dtype)
        if bias:
            self.bias = mx.zeros((dim,), dtype)
        self.has_bias, self.eps = bias, eps

    def __call__(self, x: mx.array) -> mx.array:
        h = x.astype(mx.float32)
        mean = mx.mean(h, axis=-1, keepdims=True)
        var = mx.mean(mx.square(h - mean), axis=-1, keepdims=True)
        h = ((h - mean) * mx.rsqrt(var + self.eps)).astype(x.dtype) * self.weight
        return h + self.bias if self.has_bias else h


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up one [2, F, D] tensor (gate first)."""

    def __init__(self, dim: int, hidden: int, *, act: str, bias: bool, dtype: Any):
        super().__init__()
        self.gate_up_proj = Linear(dim, (2, hidden), bias=bias, dtype=dtype)
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        gate_up = self.gate_up_proj(x)                                            # [B, T, 2, F]
        return self.down_proj(self.act(gate_up[..., 0, :]) * gate_up[..., 1, :])


def qkv_projection(dim: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool, dtype: Any) -> Linear:
    """The fused q/k/v projection, [K, G + 2, H, D] (see ``mrs.families.llama.qkv_fused``)."""
    return Linear(dim, (kv_heads, heads // kv_heads + 2, head_dim), bias=bias, dtype=dtype)


def split_qkv(qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """[B, T, K, G + 2, H] -> q [B, T, N, H], k, v [B, T, K, H]."""
    B, T, K, parts, H = qkv.shape
    G = parts - 2
    return qkv[:, :, :, :G].reshape(B, T, K * G, H), qkv[:, :, :, G], qkv[:, :, :, G + 1]


def heads(x: mx.array, count: int) -> mx.array:
    """[B, T, count * H] -> [B, T, count, H]."""
    return x.reshape(*x.shape[:2], count, x.shape[-1] // count)


# --- rotary position embeddings (tables on the host: positions are host data here) --

def rope_inv_freq(rope: Rope, seq_len: np.ndarray) -> np.ndarray:
    """[B, rotary_dim/2] frequencies for rows whose longest position is ``seq_len - 1``
    (dynamic NTK and longrope depend on it per row, as transformers recomputes them)."""
    base = rope.base_inv_freq()
    if rope.kind == "dynamic":
        dim = rope.rotary_dim
        length = np.maximum(seq_len, rope.max_position).astype(np.float32)[:, None]
        theta = rope.theta * ((rope.factor * length / rope.max_position) - (rope.factor - 1)) ** (dim / (dim - 2))
        exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
        return (1.0 / theta ** exponents[None, :]).astype(np.float32)
    if rope.kind == "longrope":
        short = np.asarray(rope.short_factor, np.float32)
        long = np.asarray(rope.long_factor, np.float32)
        ext = np.where((seq_len > rope.original_max_position)[:, None], long[None], short[None])
        return (1.0 / (ext * (1.0 / base)[None, :])).astype(np.float32)
    return np.broadcast_to(base[None, :], (seq_len.shape[0], base.shape[0]))


def rope_cos_sin(rope: Rope, positions: np.ndarray) -> tuple[mx.array, mx.array]:
    """cos, sin [B, T, rotary_dim] float32 for host positions [B, T] (-1 = padding)."""
    seq_len = positions.max(axis=1) + 1
    freqs = positions.astype(np.float32)[:, :, None] * rope_inv_freq(rope, seq_len)[:, None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return (mx.array(np.cos(angles) * np.float32(rope.attention_factor)),
            mx.array(np.sin(angles) * np.float32(rope.attention_factor)))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the first rotary_dim features of x [B, T, N, H] (HF's rotate_half layout)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = rot // 2
    rotated = mx.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return mx.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# --- attention over the cache ------------------------------------------------------

# What a hidden score adds in each dtype: finite (a row with nothing visible, padding, stays
# a uniform softmax instead of NaN) and far below any real score.
_HIDDEN = {mx.float32: float(np.finfo(np.float32).min), mx.float16: -1e4}


class StepPositions:
    """What every attention layer of one step needs from its positions [B, T] (host):
    where each new key goes in the cache and which cache entries each query sees.

    Cache layers hold S + 1 positions: the last one is a sink that padding (position
    -1) writes into, so no row ever overwrites a real position and no bounds check is
    needed. A query at position p sees s <= p (and s > p - window in a sliding-window
    layer); the sink lies past every p, so it is never seen.
    """

    def __init__(self, positions: np.ndarray, max_len: int):
        self.positions = np.asarray(positions, np.int32)
        self.max_len = int(max_len)
        self.write = mx.array(np.where((self.positions < 0) | (self.positions >= max_len), max_len,
                                       self.positions).astype(np.int32))       # [B, T]
        self._masks: dict[int | None, mx.array] = {}

    def mask(self, window: int | None, dtype: Any) -> mx.array:
        """[B, 1, T, S + 1] additive mask (0 = seen, the dtype's lowest = hidden)."""
        key = (window, dtype)
        if key not in self._masks:
            p = self.positions[:, :, None]                                        # [B, T, 1]
            s = np.arange(self.max_len + 1)[None, None, :]
            seen = (s <= p) & (p >= 0) & (s < self.max_len)
            if window is not None:
                seen &= s > p - window
            hidden = _HIDDEN.get(dtype, -1e30)                                    # bfloat16: -1e30
            self._masks[key] = mx.array(np.where(seen, 0.0, hidden)[:, None], dtype=dtype)
        return self._masks[key]


def write_cache(layer: mx.array, new: mx.array, at: StepPositions) -> mx.array:
    """Scatter new [B, T, K, H] into a layer [B, K, S + 1, H] at each row's positions."""
    B, K, _, H = layer.shape
    T = new.shape[1]
    index = mx.broadcast_to(at.write[:, None, :, None], (B, K, T, H))
    return mx.put_along_axis(layer, index, new.transpose(0, 2, 1, 3).astype(layer.dtype), axis=2)


def cached_attention(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array, at: StepPositions, *,
                     scale: float, window: int | None = None, softcap: float | None = None,
                     ) -> tuple[mx.array, mx.array, mx.array]:
    """Write this step's k, v [B, T, K, H] into the layer cache [B, K, S + 1, H], then attend
    q [B, T, N, H] causally over it. Returns out [B, T, N*H] and the new cache layers."""
    batch, steps, n_heads, head_dim = q.shape
    keys, values = write_cache(keys, k, at), write_cache(values, v, at)
    q = q.transpose(0, 2, 1, 3)                                                   # [B, N, T, H]
    if softcap is None:
        mask = at.mask(window, q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), scale=scale,
                                                   mask=mask)
    else:   # Gemma 2: scores squashed into (-cap, cap) before the mask, so the fused kernel cannot run it
        kv_heads = keys.shape[1]
        qg = q.reshape(batch, kv_heads, n_heads // kv_heads, steps, head_dim)    # [B, K, G, T, H]
        scores = (qg @ keys.astype(q.dtype)[:, :, None].swapaxes(-1, -2)).astype(mx.float32) * scale
        scores = mx.tanh(scores / softcap) * softcap                              # [B, K, G, T, S+1]
        scores = scores + at.mask(window, mx.float32)[:, :, None]
        probs = mx.softmax(scores, axis=-1).astype(v.dtype)
        out = (probs @ values.astype(v.dtype)[:, :, None]).reshape(batch, n_heads, steps, head_dim)
    return out.transpose(0, 2, 1, 3).reshape(batch, steps, n_heads * head_dim), keys, values


def rotary_attention(q, k, v, cos, sin, keys, values, at: StepPositions, *, scale: float, window: int | None = None,
                     q_norm: Any = None, k_norm: Any = None, softcap: float | None = None):
    """Optional per-head q/k norm, rotary, then ``cached_attention``."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return cached_attention(q, k, v, keys, values, at, scale=scale, window=window, softcap=softcap)


def last_valid(hidden: mx.array, positions: np.ndarray) -> mx.array:
    """hidden [B, T, D] -> [B, 1, D] at each row's last non-padding step."""
    index = mx.array(np.argmax(positions, axis=1).astype(np.int32))
    return mx.take_along_axis(hidden, index[:, None, None], axis=1)


def dense_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, *, scale: float) -> mx.array:
    """Attention without a cache (encoders): q [B, T, N, H], k, v [B, S, N, H], mask [B, S]
    (True = a real token) -> [B, T, N*H]. Softmax in float32."""
    batch, steps, n_heads, head_dim = q.shape
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))                       # [B, N, ., H]
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale                 # [B, N, T, S]
    scores = mx.where(mask[:, None, None, :], scores, float(np.finfo(np.float32).min))
    probs = mx.softmax(scores, axis=-1).astype(v.dtype)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, steps, n_heads * head_dim)
