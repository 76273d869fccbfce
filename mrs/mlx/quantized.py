"""Quantized projections in MLX: the mirror of mrs/archs/quantized.py on
``mx.quantized_matmul``, over the very arrays mrs's format stores (mrs/quant.py is MLX's
layout: uint32 codes packed low bits first, affine scales and biases per group).

MLX's kernels take groups of 32, 64 or 128 inputs; ``runs_on_mlx`` says whether a
format is one of them (the loader dequantizes the others, GGUF's Q6_K groups of 16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mrs.mlx.layers import Embedding, Linear
from mrs.quant import QuantFormat

MLX_GROUP_SIZES = (32, 64, 128)


def runs_on_mlx(fmt: QuantFormat) -> bool:
    return fmt.group_size in MLX_GROUP_SIZES


def _packed(module: nn.Module, shape: tuple[int, ...], fmt: QuantFormat) -> None:
    *out, k = shape
    scale = mx.float16 if fmt.scale_dtype == "float16" else mx.float32
    module.weight = mx.zeros((*out, fmt.packed_width(k)), mx.uint32)
    module.scales = mx.zeros((*out, k // fmt.group_size), scale)
    module.biases = mx.zeros((*out, k // fmt.group_size), scale)


class QuantLinear(nn.Module):
    """y = x W^T + b with W quantized; built from the dense Linear it replaces."""

    def __init__(self, dense: Linear, fmt: QuantFormat):
        super().__init__()
        _packed(self, tuple(dense.weight.shape), fmt)
        if dense.has_bias:
            self.bias = dense.bias
        self.has_bias, self.format = dense.has_bias, fmt
        self.dtype = dense.weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        w, s, b = self.weight, self.scales, self.biases
        out = w.shape[:-1]
        y = mx.quantized_matmul(x, w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1]), b.reshape(-1, b.shape[-1]),
                                transpose=True, group_size=self.format.group_size, bits=self.format.bits)
        y = y.astype(x.dtype).reshape(*y.shape[:-1], *out)
        return y + self.bias if self.has_bias else y


class QuantEmbedding(nn.Module):
    """Token embeddings [V, D] quantized: a lookup dequantizes only the rows it takes;
    ``attend`` (the tied head) is a quantized matmul over the whole table."""

    def __init__(self, dense: Embedding, fmt: QuantFormat):
        super().__init__()
        _packed(self, tuple(dense.weight.shape), fmt)
        self.format, self.dtype = fmt, dense.weight.dtype

    def __call__(self, tokens: mx.array) -> mx.array:
        fmt = self.format
        # mx.dequantize returns the scales' dtype: float16 scales would round the rows
        rows = mx.dequantize(self.weight[tokens], self.scales[tokens].astype(mx.float32),
                             self.biases[tokens].astype(mx.float32), group_size=fmt.group_size, bits=fmt.bits)
        return rows.astype(self.dtype)

    def attend(self, x: mx.array) -> mx.array:
        fmt = self.format
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                group_size=fmt.group_size, bits=fmt.bits)
        return y.astype(x.dtype)


def quantized_variant(formats: Mapping[str, QuantFormat]) -> Callable[[str, Any], nn.Module | None]:
    """A ``swap_linears`` variant: each projection named in ``formats`` becomes its quantized form."""

    def variant(path: str, layer: Any) -> nn.Module | None:
        fmt = formats.get(path)
        if fmt is None:
            return None
        return (QuantEmbedding if isinstance(layer, Embedding) else QuantLinear)(layer, fmt)

    return variant
