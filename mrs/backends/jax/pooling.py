"""Sentence-transformers pooling of encoder states, in jnp (what mrs.embedding.Pooling describes)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def pool(hidden: jax.Array, mask: jax.Array, pooling: Any) -> jax.Array:
    """hidden [B, T, D], mask [B, T] -> [B, D * len(modes)] float32, as ``pooling`` (mrs.embedding.Pooling) says."""
    h = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]                                   # [B, T, 1]
    count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)                             # [B, 1]
    out = []
    for mode in pooling.modes:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(jnp.max(jnp.where(m > 0, h, -1e9), axis=1))
        elif mode == "mean":
            out.append(jnp.sum(h * m, axis=1) / count)
        elif mode == "mean_sqrt_len":
            out.append(jnp.sum(h * m, axis=1) / jnp.sqrt(count))
        elif mode == "weightedmean":
            w = m * jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
            out.append(jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9))
        elif mode == "lasttoken":
            last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
            out.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    pooled = jnp.concatenate(out, axis=-1)
    if pooling.normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled
