"""GGUF v2/v3 headers read straight from a memory map.

gguf's own ``GGUFReader`` builds a numpy view per metadata item: for a 262,144-token
vocabulary that is over half a million views and 12 s before the first tensor (2-core
CPU, Gemma 3 270M). This reads the same layout (the spec in ggml's docs/gguf.md) with
one pass of ``struct`` over the header; tensor data stays in the memory map, and the
tensor types, sizes and dequantization still come from the gguf package.

Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count; each metadata
item is a string key, a u32 type and a value (arrays: u32 item type, u64 count, items);
each tensor info is a string name, u32 dims, u64 extents (fastest first), u32 type, u64
offset; tensor data starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrs.errors import UnsupportedModelError, WeightsError

# GGUF value type -> struct format (8 = string, 9 = array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int                      # GGMLQuantizationType value
    extents: tuple[int, ...]       # GGUF order: the fastest-varying axis first
    offset: int                    # from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy (row-major) shape: extents reversed."""
        return tuple(reversed(self.extents))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.extents, dtype=np.int64)) if self.extents else 1


class _Cursor:
    def __init__(self, buffer: memoryview, name: str):
        self.buffer, self.at, self.name = buffer, 0, name

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.buffer):
            raise self.truncated()
        value = struct.unpack_from("<" + fmt, self.buffer, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("Q")
        if self.at + length > len(self.buffer):
            raise self.truncated()
        raw = bytes(self.buffer[self.at:self.at + length])
        self.at += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def truncated(self) -> WeightsError:
        return WeightsError(f"GGUF file {self.name} ends inside its header (truncated download? fetch it again)")

    def strings(self, count: int) -> list[str]:
        """An array of strings in one tight loop: a vocabulary holds up to ~260k of them."""
        buffer, at, end, out = self.buffer, self.at, len(self.buffer), []
        length_at = _U64.unpack_from
        for _ in range(count):
            if at + 8 > end:
                raise self.truncated()
            (length,) = length_at(buffer, at)
            at += 8
            if at + length > end:
                raise self.truncated()
            out.append(str(buffer[at:at + length], "utf-8", "replace"))
            at += length
        self.at = at
        return out

    def value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in SCALARS:       # one unpack for the whole array
                fmt = SCALARS[item]
                size = struct.calcsize(fmt) * count
                if self.at + size > len(self.buffer):
                    raise self.truncated()
                values = np.frombuffer(self.buffer, dtype=np.dtype("<" + fmt), count=count, offset=self.at).tolist()
                self.at += size
                return values
            if item == STRING:
                return self.strings(count)
            return [self.value(item) for _ in range(count)]
        raise WeightsError(f"GGUF file {self.name} has a metadata value of unknown type {kind}")


@dataclass
class Header:
    version: int
    fields: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int
    data: np.memmap


def read(path: Path) -> Header:
    """Parse a GGUF file's metadata and tensor table (raises WeightsError on a broken file)."""
    path = Path(path)
    try:
        data = np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read GGUF file {path.name}: {e}") from e
    cursor = _Cursor(memoryview(data), path.name)
    if bytes(data[:4]) != MAGIC:
        raise WeightsError(f"{path.name} is not a GGUF file (no GGUF magic)")
    cursor.at = 4
    version = cursor.take("I")
    if version not in (2, 3):
        raise UnsupportedModelError(f"GGUF file {path.name} is version {version}; mrs reads versions 2 and 3")
    n_tensors, n_fields = cursor.take("Q"), cursor.take("Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cursor.string()
        fields[key] = cursor.value(cursor.take("I"))
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        name = cursor.string()
        dims = cursor.take("I")
        if dims > 8:
            raise WeightsError(f"GGUF tensor {name} in {path.name} claims {dims} dimensions (corrupt file?)")
        extents = tuple(int(cursor.take("Q")) for _ in range(dims))
        tensors[name] = TensorInfo(name, int(cursor.take("I")), extents, int(cursor.take("Q")))
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    start = (cursor.at + alignment - 1) // alignment * alignment
    return Header(version, fields, tensors, start, data)


def tensor_bytes(header: Header, info: TensorInfo, path_name: str) -> np.ndarray:
    """The tensor's raw data as gguf.quants.dequantize takes it (float views for F32/F16,
    [rows, bytes per row] uint8 for block-quantized and BF16 types)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(info.type)
    except ValueError as e:
        raise UnsupportedModelError(f"GGUF tensor {info.name} has unknown type {info.type}") from e
    block, type_size = GGML_QUANT_SIZES[qtype]
    ne0 = info.extents[0] if info.extents else 1
    if ne0 % block:
        raise WeightsError(f"GGUF tensor {info.name}: {ne0} values per row is not a whole number of "
                           f"{qtype.name} blocks of {block}")
    nbytes = info.n_elements // block * type_size
    begin = header.data_start + info.offset
    if begin + nbytes > len(header.data):
        raise WeightsError(f"GGUF file {path_name} ends inside tensor {info.name} (truncated download? fetch it again)")
    raw = header.data[begin:begin + nbytes]
    floats = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if qtype in floats:
        return raw.view(floats[qtype]).reshape(info.shape)
    return raw.reshape(info.shape[:-1] + (ne0 // block * type_size,))
