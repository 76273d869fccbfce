"""Quantized projections: Linear and Embedding variants whose weight stays in mrs's
quantized format (mrs/quant.py) and runs through ``mrs.kernels.qmatmul``.

They keep the dense layers' call signatures and output axes, so ``swap_linears`` puts
them in any family: a fused q/k/v weight [K, G + 2, H, D] becomes codes
[K, G + 2, H, D * bits / 32] with scales and biases [K, G + 2, H, D / group], every row
of the matrix quantized along its inputs exactly as when it is stored apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import Embedding, Linear, Projection, register_projection
from mrs.kernels.qmatmul import dequantize, qmatmul
from mrs.quant import QuantFormat


def _packed(shape: tuple[int, ...], fmt: QuantFormat, axes: tuple[str, ...]) -> dict[str, nnx.Param]:
    """The three params of a quantized [*out, K] weight (scales kept in their own dtype)."""
    *out, k = shape
    lead = tuple(out)
    scale = jnp.dtype(fmt.scale_dtype)
    return {"weight": nnx.Param(jnp.zeros(lead + (fmt.packed_width(k),), jnp.uint32), axes=axes),
            "scales": nnx.Param(jnp.zeros(lead + (k // fmt.group_size,), scale), axes=axes, keep_dtype=True),
            "biases": nnx.Param(jnp.zeros(lead + (k // fmt.group_size,), scale), axes=axes, keep_dtype=True)}


def _axes(param: Any) -> tuple[str, ...]:
    return tuple(param.get_metadata().get("axes") or ())


@register_projection
class QuantLinear(nnx.Module):
    """y = x W^T + b with W quantized; built from the dense Linear it replaces."""

    def __init__(self, dense: Linear, fmt: QuantFormat, kernel: str):
        for name, p in _packed(tuple(dense.weight.shape), fmt, _axes(dense.weight)).items():
            setattr(self, name, p)
        self.bias = dense.bias
        self.bits, self.kernel, self.in_features = fmt.bits, kernel, int(dense.weight.shape[-1])
        self.format = fmt

    def __call__(self, x: jax.Array) -> jax.Array:
        w, s, b = self.weight[...], self.scales[...], self.biases[...]
        out = w.shape[:-1]
        y = qmatmul(x, w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1]), b.reshape(-1, b.shape[-1]),
                    bits=self.bits, kernel=self.kernel)
        y = y.reshape(y.shape[:-1] + out)
        return y + self.bias[...] if self.bias is not None else y


@register_projection
class QuantEmbedding(nnx.Module):
    """Token embeddings [V, D] quantized: a lookup dequantizes only the rows it takes, and
    ``attend`` (the tied output head) is a quantized matmul over the whole table."""

    def __init__(self, dense: Embedding, fmt: QuantFormat, kernel: str):
        for name, p in _packed(tuple(dense.weight.shape), fmt, _axes(dense.weight)).items():
            setattr(self, name, p)
        self.bits, self.kernel, self.dtype = fmt.bits, kernel, dense.weight.dtype
        self.in_features = int(dense.weight.shape[-1])
        self.format = fmt

    def __call__(self, tokens: jax.Array) -> jax.Array:
        take = lambda p: jnp.take(p[...], tokens, axis=0)  # noqa: E731
        return dequantize(take(self.weight), take(self.scales), take(self.biases), self.bits, self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return qmatmul(x, self.weight[...], self.scales[...], self.biases[...], bits=self.bits, kernel=self.kernel)


def quantized_variant(formats: Mapping[str, QuantFormat], kernel: str) -> Callable[[str, Projection], Any]:
    """A ``swap_linears`` variant: each projection named in ``formats`` (by module path)
    becomes its quantized form; the new params are abstract, like the model they join."""

    def variant(path: str, layer: Projection) -> nnx.Module | None:
        fmt = formats.get(path)
        if fmt is None:
            return None
        cls = QuantEmbedding if isinstance(layer, Embedding) else QuantLinear
        return nnx.eval_shape(lambda: cls(layer, fmt, kernel))

    return variant


def quantized_formats(model: nnx.Module) -> dict[str, QuantFormat]:
    """{module path: format} of every quantized projection in a model."""
    out = {}
    for path, module in model.iter_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            out[".".join(map(str, path))] = module.format
    return out
