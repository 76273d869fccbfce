"""mrs/quant.py: the packed format (MLX's layout) and the lossless conversions from GGUF's
blocks, held to gguf's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrs import quant
from mrs.errors import UnsupportedModelError

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def gguf_blocks(kind_name: str, rows: int, k: int, rng) -> np.ndarray:
    """Blocks gguf's own quantizer writes, or (for types it cannot write) random blocks
    whose float16 fields are finite."""
    import gguf
    from gguf.quants import quantize

    kind = getattr(gguf.GGMLQuantizationType, kind_name)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    try:
        return quantize(w, kind)
    except NotImplementedError:
        per, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, size=(rows * k // per, size), dtype=np.uint8)
        halves = {"Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}[kind_name]
        raw[:, halves[0]:halves[1]] = rng.uniform(-0.01, 0.01, (len(raw), (halves[1] - halves[0]) // 2)
                                                  ).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_blocks_convert_exactly(kind):
    import gguf
    from gguf.quants import dequantize

    rng = np.random.default_rng(GGUF_TYPES.index(kind))
    raw = gguf_blocks(kind, 6, 512, rng)
    reference = dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(6, 512)
    q = quant.from_gguf(raw, kind, (6, 512))
    fmt = quant.GGUF_FORMATS[kind]
    assert (q.bits, q.group_size) == (fmt.bits, fmt.group_size) and int(q.codes.max()) < 2 ** q.bits
    np.testing.assert_array_equal(q.dequantize(), reference)
    stored = q.packed(fmt)
    assert stored["weight"].dtype == np.uint32 and stored["weight"].shape == (6, 512 * fmt.bits // 32)
    assert stored["scales"].dtype == np.dtype(fmt.scale_dtype) and stored["scales"].shape == (6, 512 // fmt.group_size)
    np.testing.assert_array_equal(quant.dequantize(stored["weight"], stored["scales"], stored["biases"], fmt.bits),
                                  reference)


def test_formats_widen_without_loss_for_stacked_parts():
    """A 5-bit g32 part and an 8-bit g16 part stack as 8-bit g16; the values stay exact."""
    rng = np.random.default_rng(1)
    five = quant.from_gguf(gguf_blocks("Q5_0", 4, 256, rng), "Q5_0", (4, 256))
    wide = quant.covering({"a": quant.GGUF_FORMATS["Q5_0"], "b": quant.GGUF_FORMATS["Q6_K"]})
    assert (wide.bits, wide.group_size, wide.scale_dtype) == (8, 16, "float32")
    stored = five.packed(wide)
    np.testing.assert_array_equal(quant.dequantize(stored["weight"], stored["scales"], stored["biases"], 8),
                                  five.dequantize())
    assert quant.covering({"a": wide, "b": None}) is None
    with pytest.raises(ValueError):
        five.to(quant.QuantFormat(4, 32))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(quant.BITS), rows=st.integers(1, 9), words=st.integers(1, 6), seed=st.integers(0, 99))
def test_pack_and_unpack_are_inverse_bit_streams(bits, rows, words, seed):
    k = words * 32
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(rows, k), dtype=np.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (rows, k * bits // 32)
    np.testing.assert_array_equal(quant.unpack(packed, bits, k), codes)
    # the layout itself: code i sits in bits [i * bits, (i + 1) * bits) of the row's little-endian stream
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    i = seed % k
    assert int(sum(int(b) << j for j, b in enumerate(stream[0, i * bits:(i + 1) * bits]))) == codes[0, i]


@pytest.mark.parametrize("bits", quant.BITS)
def test_quantizing_dense_weights_bounds_the_error_by_half_a_step(bits):
    w = np.random.default_rng(bits).standard_normal((16, 128)).astype(np.float32)
    q = quant.quantize(w, bits, 32)
    step = np.repeat(q.scales, 32, axis=-1)
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 + 1e-6)


def test_bad_formats_are_refused():
    with pytest.raises(Exception, match="bits"):
        quant.QuantFormat(3, 32)
    with pytest.raises(UnsupportedModelError, match="groups"):
        quant.quantize(np.zeros((2, 40), np.float32), 8, 32)
    with pytest.raises(UnsupportedModelError, match="IQ2_XS"):
        quant.from_gguf(np.zeros((1, 66), np.uint8), "IQ2_XS", (1, 256))
