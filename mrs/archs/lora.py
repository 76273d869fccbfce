"""LoRA-adapted projections: y = base(x) + scale * B A dropout(x), per checkpoint module.

A ``LoraLinear`` wraps any projection with Linear's call signature (dense or quantized,
so QLoRA is a LoraLinear around a QuantLinear) and keeps one (A [r, D], B [*lead, r])
pair per checkpoint module inside it (``mrs.adapters.Piece``): a fused q/k/v projection
[K, G + 2, H] adapted on q_proj and v_proj holds two pairs, and their outputs land in
the q and v spans of the fused axis, so the adapter stays PEFT's.

Axis letters as in archs/layers.py, plus r (the rank), R (the rank times the pieces) and O
(the projection's outputs, flattened). A and B are ``LoraParam``s (an ``nnx.Param``
subtype): ``nnx.split(model, LoraParam, ...)`` separates what trains from the frozen base.
They stay float32 whatever the base's dtype.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs.adapters import AdapterError, Piece
from mrs.archs.layers import Embedding, register_projection

# The dropout key of the step being traced (None: no dropout, as at inference).
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


@contextmanager
def dropout_key(key: jax.Array | None):
    """Run the LoRA layers called inside with dropout drawn from ``key`` (each layer folds
    in its own index, so layers draw independent masks)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class LoraParam(nnx.Param):
    """A trainable LoRA factor."""


def init_a(rank: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """PEFT's (and torch's Linear) init for A: kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(in), 1/sqrt(in)). B starts at zero, so the adapted model starts as the base."""
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)


@register_projection
class LoraLinear(nnx.Module):
    """A projection plus low-rank updates, one per checkpoint module it holds."""

    def __init__(self, base: nnx.Module, pieces: Sequence[Piece], *, rank: int, scale: float, dropout: float,
                 index: int, rng: np.random.Generator):
        self.base = base
        weight = base.weight
        self.out = tuple(int(n) for n in weight.shape[:-1])
        in_features = int(getattr(base, "in_features", weight.shape[-1]))
        self.pieces = tuple(pieces)
        self.lora_a = nnx.List([LoraParam(jnp.asarray(init_a(rank, in_features, rng))) for _ in pieces])
        self.lora_b = nnx.List([LoraParam(jnp.zeros(p.lead + (rank,), jnp.float32)) for p in pieces])
        self.scale, self.dropout, self.index = float(scale), float(dropout), int(index)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x.astype(jnp.float32)
        rank = self.lora_a[0].shape[0]
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0:     # a mask per checkpoint module, as PEFT draws
            u = jnp.concatenate([jnp.einsum("...D,rD->...r", self._dropped(h, key, i), a[...])
                                 for i, a in enumerate(self.lora_a)], axis=-1)
        else:
            a = jnp.concatenate([a[...] for a in self.lora_a], axis=0)            # [P*r, D]
            u = jnp.einsum("...D,RD->...R", h, a)                                    # [..., P*r]
        b = self._joined_b().reshape(-1, len(self.pieces) * rank)               # [O, P*r]
        delta = jnp.einsum("...R,OR->...O", u, b).reshape(u.shape[:-1] + self.out)
        return y + (delta * self.scale).astype(y.dtype)

    def _dropped(self, h: jax.Array, key: jax.Array, piece: int) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(key, self.index), piece)
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
        return jnp.where(keep, h / (1.0 - self.dropout), 0.0)

    def _joined_b(self) -> jax.Array:
        """All pieces' B as one [*O, P*r] matrix: piece p's rows in its span of the fused axis,
        its own r columns, zeros elsewhere. Two matmuls then serve every piece, and the zeros
        are weight-sized (an activation-sized pad per piece costs a training step a third of
        its time in copies)."""
        count, rank = len(self.pieces), self.lora_a[0].shape[0]
        axis = self.pieces[0].axis
        if axis is None:                    # one piece covering the whole projection
            return self.lora_b[0][...]
        segments, filled = [], 0

        def zeros(size: int) -> jax.Array:
            return jnp.zeros(self.out[:axis] + (size,) + self.out[axis + 1:] + (count * rank,), jnp.float32)

        for index, (piece, b) in sorted(enumerate(zip(self.pieces, self.lora_b, strict=True)),
                                        key=lambda item: item[1][0].start):
            if piece.start > filled:
                segments.append(zeros(piece.start - filled))
            width = [(0, 0)] * (len(self.out) + 1)
            width[-1] = (index * rank, (count - 1 - index) * rank)
            segments.append(jnp.pad(b[...], width))
            filled = piece.stop
        if filled < self.out[axis]:
            segments.append(zeros(self.out[axis] - filled))
        return jnp.concatenate(segments, axis=axis)


def lora_variant(pieces: Mapping[str, Sequence[Piece]], *, rank: int, scale: float, dropout: float = 0.0,
                 seed: int = 0) -> Callable[[str, Any], nnx.Module | None]:
    """A ``swap_linears`` variant: each projection named in ``pieces`` (by module path) gains
    LoRA factors; A drawn from ``seed`` in path order, so a run is reproducible."""
    rng = np.random.default_rng(seed)
    counter = iter(range(1 << 30))

    def variant(path: str, layer: Any) -> nnx.Module | None:
        found = pieces.get(path)
        if not found:
            return None
        if isinstance(layer, Embedding) or not hasattr(layer, "weight"):
            raise AdapterError(f"LoRA adapts linear projections only; {path} is an embedding")
        return LoraLinear(layer, found, rank=rank, scale=scale, dropout=dropout, index=next(counter), rng=rng)

    return variant
