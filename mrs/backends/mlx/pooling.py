"""Sentence-transformers pooling of encoder states in MLX (the mirror of
mrs/backends/jax/pooling.py; mrs.embedding.Pooling describes the modes)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx


def pool(hidden: mx.array, mask: mx.array, pooling: Any) -> mx.array:
    """hidden [B, T, D], mask [B, T] -> [B, D * len(modes)] float32."""
    h = hidden.astype(mx.float32)
    m = mask.astype(mx.float32)[..., None]                                    # [B, T, 1]
    count = mx.maximum(mx.sum(m, axis=1), 1e-9)                               # [B, 1]
    out = []
    for mode in pooling.modes:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(mx.max(mx.where(m > 0, h, -1e9), axis=1))
        elif mode == "mean":
            out.append(mx.sum(h * m, axis=1) / count)
        elif mode == "mean_sqrt_len":
            out.append(mx.sum(h * m, axis=1) / mx.sqrt(count))
        elif mode == "weightedmean":
            w = m * mx.arange(1, h.shape[1] + 1, dtype=mx.float32)[None, :, None]
            out.append(mx.sum(h * w, axis=1) / mx.maximum(mx.sum(w, axis=1), 1e-9))
        elif mode == "lasttoken":
            last = mx.maximum(mx.sum(mask.astype(mx.int32), axis=1) - 1, 0)
            out.append(mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    pooled = mx.concatenate(out, axis=-1)
    if pooling.normalize:
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled
