"""mrs's one quantized weight format, and the conversions into it.

A quantized matrix [N, K] (N output rows, K inputs) is three arrays, laid out as MLX's
quantized checkpoints lay them out, so ``mlx-community`` models load as they are and the
MLX backend can hand them to ``mx.quantized_matmul``:

- ``weight`` uint32 [N, K * bits / 32]: each row's codes as one little-endian bit
  stream (code k in bits [k * bits, (k + 1) * bits)); for 4 and 8 bits that is code j
  of each word in its bits [j * bits, (j + 1) * bits);
- ``scales`` and ``biases`` [N, K / group_size]: w[n, k] = scales[n, g] * code + biases[n, g]
  for g = k // group_size (affine, so symmetric formats are the case bias = -offset * scale).

Bits are 4, 5 or 8 and the group size 16, 32, 64 or 128. Scales and biases are float16
where every value is exact in float16, else float32 (a K-quant's scale is a float16 times
a 6-bit integer: exact in float32 only).

GGUF's block types convert without loss where the math allows (``from_gguf``): Q8_0 ->
8-bit g32; Q4_0, Q4_1, Q4_K -> 4-bit g32; Q5_0, Q5_1, Q5_K -> 5-bit g32; Q6_K -> 8-bit
g16 (its 6-bit codes, one scale per 16). Every other type (Q2_K, Q3_K, the IQ types,
F16, BF16) has no lossless form here and is dequantized to dense (``GGUF_FORMATS``).
"""

from __future__ import annotations


from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from mrs.errors import InvalidParameterError, UnsupportedModelError

if TYPE_CHECKING:
    from mrs.weights import Fused

BITS = (4, 5, 8)
GROUP_SIZES = (16, 32, 64, 128)
LEAVES = ("weight", "scales", "biases")


@dataclass(frozen=True)
class QuantFormat:
    """How one matrix is quantized: bits per code, inputs per scale, and the scales' dtype."""

    bits: int
    group_size: int
    scale_dtype: str = "float32"      # "float16" where exact

    def __post_init__(self):
        if self.bits not in BITS:
            raise InvalidParameterError("bits", self.bits, f"one of {BITS}")
        if self.group_size not in GROUP_SIZES:
            raise InvalidParameterError("group_size", self.group_size, f"one of {GROUP_SIZES}")
        if self.scale_dtype not in ("float16", "float32"):
            raise InvalidParameterError("scale_dtype", self.scale_dtype, "float16 or float32")

    def packed_width(self, k: int) -> int:
        """uint32 words per row of ``k`` inputs."""
        self.check_inputs(k)
        return k * self.bits // 32

    def check_inputs(self, k: int) -> None:
        if k % 32 or k % self.group_size:
            raise UnsupportedModelError(f"a quantized matrix needs inputs in whole groups of 32 and of "
                                        f"{self.group_size}; this one has {k}")

    def fitting(self, k: int) -> QuantFormat | None:
        """This format for a matrix of ``k`` inputs, or its 32-wide-group twin where ``k`` is
        not whole groups of it, or None where neither fits (the matrix stays dense)."""
        for group in (self.group_size, 32):
            if k % group == 0 and k % 32 == 0:
                return replace(self, group_size=group)
        return None

    def covering(self, other: QuantFormat) -> QuantFormat:
        """The narrowest format both convert into without loss (more bits, smaller groups)."""
        wide = "float32" if "float32" in (self.scale_dtype, other.scale_dtype) else "float16"
        return QuantFormat(max(self.bits, other.bits), min(self.group_size, other.group_size), wide)

    def __str__(self) -> str:
        return f"{self.bits}-bit g{self.group_size}"


@dataclass(frozen=True)
class Quantized:
    """One quantized matrix: codes [..., N, K] before packing, plus scales and biases."""

    codes: np.ndarray          # uint8 [N, K], each < 2 ** bits
    scales: np.ndarray         # float32 [N, K / group]
    biases: np.ndarray         # float32 [N, K / group]
    bits: int
    group_size: int

    @property
    def format(self) -> QuantFormat:
        exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in (self.scales, self.biases))
        return QuantFormat(self.bits, self.group_size, "float16" if exact else "float32")

    def to(self, fmt: QuantFormat) -> Quantized:
        """The same values in a format with at least as many bits and groups that divide these."""
        if fmt.bits < self.bits or self.group_size % fmt.group_size:
            raise ValueError(f"{self.bits}-bit g{self.group_size} does not convert into {fmt} without loss")
        repeat = self.group_size // fmt.group_size
        return Quantized(self.codes, np.repeat(self.scales, repeat, axis=-1), np.repeat(self.biases, repeat, axis=-1),
                         fmt.bits, fmt.group_size)

    def packed(self, fmt: QuantFormat | None = None) -> dict[str, np.ndarray]:
        """{"weight", "scales", "biases"} as stored (see the module docstring)."""
        q = self if fmt is None else self.to(fmt)
        fmt = fmt or q.format
        dtype = np.dtype(fmt.scale_dtype)
        out = {"weight": pack(q.codes, q.bits), "scales": q.scales.astype(dtype), "biases": q.biases.astype(dtype)}
        if dtype != np.float32 and not all(np.array_equal(out[k].astype(np.float32), getattr(q, k))
                                           for k in ("scales", "biases")):
            raise ValueError(f"scales of this matrix are not exact in {dtype}")
        return out

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        w = self.codes.reshape(n, k // self.group_size, self.group_size).astype(np.float32)
        return (w * self.scales[..., None] + self.biases[..., None]).reshape(n, k)


# --- packing ---------------------------------------------------------------------------

def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> uint32 [N, K * bits / 32], each row one little-endian bit stream."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, k = codes.shape
    if (k * bits) % 32:
        raise ValueError(f"{k} codes of {bits} bits do not fill whole 32-bit words")
    if bits == 8:                                   # byte j of a little-endian word is code j
        return codes.view("<u4").copy()
    if bits == 4:                                   # two codes a byte, the first in the low nibble
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view("<u4")
    out = np.empty((n, k * bits // 32), "<u4")
    rows = max(1, (1 << 20) // max(k, 1))           # bound the 64-bit temporaries to ~1M codes
    shifts = (np.arange(8, dtype=np.uint64) * bits)
    for start in range(0, n, rows):                 # 8 codes = `bits` whole bytes of a 64-bit word
        part = codes[start:start + rows].reshape(-1, k // 8, 8).astype(np.uint64)
        words = np.bitwise_or.reduce(part << shifts, axis=-1).astype("<u8")
        chunk = words.view(np.uint8).reshape(len(words), k // 8, 8)[:, :, :bits]
        out[start:start + rows] = np.ascontiguousarray(chunk).reshape(len(words), -1).view("<u4")
    return out


def unpack(weight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint32 [N, K * bits / 32] -> uint8 codes [N, K] (the inverse of ``pack``)."""
    weight = np.ascontiguousarray(weight, dtype="<u4")
    n = weight.shape[0]
    stream = np.unpackbits(weight.view(np.uint8).reshape(n, -1), axis=-1, bitorder="little")
    stream = stream[:, : k * bits].reshape(n, k, bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., 0]


def dequantize(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """Packed arrays [..., N, *] -> float32 [..., N, K] (the reference every kernel is held to)."""
    lead = weight.shape[:-1]
    groups = scales.shape[-1]
    k = weight.shape[-1] * 32 // bits
    codes = unpack(weight.reshape(-1, weight.shape[-1]), bits, k)
    q = Quantized(codes, scales.reshape(-1, groups).astype(np.float32), biases.reshape(-1, groups).astype(np.float32),
                  bits, k // groups)
    return q.dequantize().reshape(lead + (k,))


# --- quantizing dense weights ----------------------------------------------------------

def quantize(w: np.ndarray, bits: int, group_size: int) -> Quantized:
    """Affine min/max quantization per group of ``group_size`` inputs (rows = outputs)."""
    QuantFormat(bits, group_size).check_inputs(w.shape[-1])
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    levels = (1 << bits) - 1
    scales = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
    codes = np.clip(np.rint((g - lo[..., None]) / scales[..., None]), 0, levels).astype(np.uint8)
    return Quantized(codes.reshape(n, k), scales, lo.astype(np.float32), bits, group_size)


# --- GGUF blocks -----------------------------------------------------------------------

def _f16(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32]: low nibbles (elements 0-15), then high (16-31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return b[:, 2:34] ^ np.uint8(0x80), d[:, None], -128 * d[:, None], 8, 32     # int8 + 128


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles_split(b[:, 2:18]), d[:, None], -8 * d[:, None], 4, 32


def _q4_1(b):
    return _nibbles_split(b[:, 4:20]), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None], 4, 32


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the 32 fifth bits of a block, as a uint32 read little-endian."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b):
    d = _f16(b[:, 0:2])
    codes = _nibbles_split(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4)
    return codes, d[:, None], -16 * d[:, None], 5, 32


def _q5_1(b):
    codes = _nibbles_split(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4)
    return codes, _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None], 5, 32


def _k_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 128 bytes -> 256 low nibbles; each 32 bytes hold 64 elements (low, then high)."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 256)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return _k_low(b[:, 16:144]), d[:, None] * sc, -(dmin[:, None] * mn), 4, 32


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48]                                     # bit 2j (first 32 of chunk j) and 2j + 1
    high = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return _k_low(b[:, 48:176]) | (high.reshape(-1, 256) << 4), d[:, None] * sc, -(dmin[:, None] * mn), 5, 32


def _q6_k(b):
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    codes = np.empty((len(b), 256), np.uint8)
    for half in range(2):                                # 128 elements from 64 ql bytes and 32 qh bytes
        low, high = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
        out = codes[:, 128 * half:128 * half + 128]
        out[:, 0:32] = (low[:, 0:32] & 0x0F) | ((high & 3) << 4)
        out[:, 32:64] = (low[:, 32:64] & 0x0F) | (((high >> 2) & 3) << 4)
        out[:, 64:96] = (low[:, 0:32] >> 4) | (((high >> 4) & 3) << 4)
        out[:, 96:128] = (low[:, 32:64] >> 4) | (((high >> 6) & 3) << 4)
    scale = d[:, None] * sc
    return codes, scale, -32 * scale, 8, 16


# GGUF type name -> (elements per block, bytes per block, decoder)
_GGUF = {"Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, _q5_0),
         "Q5_1": (32, 24, _q5_1), "Q4_K": (256, 144, _q4_k), "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k)}
# The legacy types' scales are float16 and their offsets powers of two: exact in float16.
GGUF_FORMATS = {"Q8_0": QuantFormat(8, 32, "float16"), "Q4_0": QuantFormat(4, 32, "float16"),
                "Q4_1": QuantFormat(4, 32, "float16"), "Q5_0": QuantFormat(5, 32, "float16"),
                "Q5_1": QuantFormat(5, 32, "float16"), "Q4_K": QuantFormat(4, 32), "Q5_K": QuantFormat(5, 32),
                "Q6_K": QuantFormat(8, 16)}


def from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> Quantized:
    """A GGUF tensor's raw blocks (uint8 [rows, bytes per row]) -> its exact quantized form."""
    if type_name not in _GGUF:
        raise UnsupportedModelError(f"GGUF type {type_name} has no lossless quantized form in mrs")
    per, size, decode = _GGUF[type_name]
    n, k = int(np.prod(shape[:-1])), int(shape[-1])
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    if len(blocks) != n * k // per:
        raise ValueError(f"{len(blocks)} {type_name} blocks do not hold a {shape} tensor")
    codes, scales, biases, bits, group = decode(blocks)
    return Quantized(codes.reshape(n, k), scales.reshape(n, -1).astype(np.float32),
                     biases.reshape(n, -1).astype(np.float32), bits, group)


def plan(formats: Mapping[str, QuantFormat | None], fused: Mapping[str, Fused]
         ) -> tuple[dict[str, QuantFormat], dict[str, QuantFormat]]:
    """Checkpoint modules' formats -> ({model module: format}, {checkpoint module: the
    format to convert it to}). Parts stacked into one model tensor (``fused``) share the
    format covering them all; a model tensor with any dense part stays dense."""
    from mrs.weights import module_prefix

    def target(module: str) -> str:
        for name, spec in fused.items():
            for part, _ in spec.parts:
                prefix = module_prefix(module, part)
                if prefix is not None:
                    return f"{prefix}{name}"
        return module

    groups: dict[str, dict[str, QuantFormat | None]] = {}
    for module, fmt in formats.items():
        groups.setdefault(target(module), {})[module] = fmt
    model = {m: fmt for m, parts in groups.items() if (fmt := covering(parts)) is not None}
    checkpoint = {module: model[m] for m, parts in groups.items() if m in model for module in parts}
    return model, checkpoint


def covering(formats: Mapping[str, QuantFormat | None]) -> QuantFormat | None:
    """The one format parts stacked into a tensor share, or None (dense) if any part is dense."""
    out: QuantFormat | None = None
    for fmt in formats.values():
        if fmt is None:
            return None
        out = fmt if out is None else out.covering(fmt)
    return out
