"""Quantized safetensors checkpoints in MLX's layout: read (``formats``, ``converted``) and
written (``write``, behind ``mrs quantize``).

An ``mlx-community`` model folder says ``"quantization": {"group_size": 64, "bits": 4}``
in config.json (optionally with per-module overrides, or ``false`` for a module kept
dense) and holds, for each quantized module, ``<module>.weight`` (uint32 codes),
``<module>.scales`` and ``<module>.biases`` (mrs/quant.py describes the layout). A module
is quantized exactly when its ``.scales`` tensor is there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mrs import quant, store
from mrs.errors import InvalidParameterError, NotAModelError, WeightsError
from mrs.quant import QuantFormat
from mrs.store import ModelExistsError
from mrs.weights import checkpoint_files, iter_tensors

SHARD_BYTES = 2 << 30          # shards `write` starts a new file past
KEPT = ("*.safetensors", "model.safetensors.index.json", "*.lock", ".cache", ".partial-*")


def quantization(config: Mapping[str, Any]) -> dict | None:
    """config.json's quantization block (mlx-lm writes it twice, under both names)."""
    block = config.get("quantization") or config.get("quantization_config")
    if block is None or not isinstance(block, dict) or "bits" not in block:
        return None
    return block


def formats(folder: Path, config: Mapping[str, Any]) -> dict[str, QuantFormat]:
    """{checkpoint module: its format} for every module whose scales the checkpoint holds."""
    from safetensors import safe_open

    block = quantization(config)
    if block is None:
        return {}
    out: dict[str, QuantFormat] = {}
    for name, file in checkpoint_files(folder).items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        own = block.get(module) if isinstance(block.get(module), dict) else {}
        with safe_open(str(file), framework="numpy") as handle:
            kind = handle.get_slice(name).get_dtype()
        try:
            out[module] = QuantFormat(int(own.get("bits", block["bits"])),
                                      int(own.get("group_size", block.get("group_size", 64))),
                                      "float16" if kind == "F16" else "float32")
        except InvalidParameterError as e:
            raise NotAModelError(f"{folder} is quantized as mrs cannot run it ({module}: {e})") from e
    return out


def converted(stream: Iterable[tuple[str, np.ndarray]], stored: Mapping[str, QuantFormat],
              wanted: Mapping[str, QuantFormat]) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint's tensors as the model takes them: each quantized module in the
    format of its model tensor (parts stacked into one share the widest, see
    ``quant.plan``), or dequantized to float32 where the model keeps it dense."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, array in stream:
        module, _, leaf = name.rpartition(".")
        have = stored.get(module)
        if have is None or leaf not in quant.LEAVES:
            yield name, array
            continue
        want = wanted.get(module)
        if want is None:                    # dense in the model: its three arrays make one weight
            parts = pending.setdefault(module, {})
            parts[leaf] = array
            if len(parts) == len(quant.LEAVES):
                del pending[module]
                yield f"{module}.weight", quant.dequantize(parts["weight"], parts["scales"], parts["biases"], have.bits)
        elif have == want:
            yield name, array
        elif leaf == "weight":
            k = array.shape[-1] * 32 // have.bits
            codes = quant.unpack(array.reshape(-1, array.shape[-1]), have.bits, k)
            yield name, quant.pack(codes, want.bits).reshape(array.shape[:-1] + (-1,))
        else:
            repeat = have.group_size // want.group_size
            yield name, np.repeat(np.asarray(array, np.float32), repeat, axis=-1).astype(want.scale_dtype)
    if pending:
        module, parts = next(iter(pending.items()))
        missing = sorted(set(quant.LEAVES) - set(parts))
        raise WeightsError(f"quantized module {module} lacks its {', '.join(missing)} tensor(s)")


def module_formats(folder: Path, config: Mapping[str, Any]) -> dict[str, QuantFormat | None]:
    """``formats`` plus None for every other ``.weight`` (a dense part keeps its tensor dense)."""
    stored: dict[str, QuantFormat | None] = dict(formats(folder, config))
    for name in checkpoint_files(folder):
        if name.endswith(".weight"):
            stored.setdefault(name.removesuffix(".weight"), None)
    return stored


def write(source: Path, target: Path, bits: int, group_size: int) -> dict[str, int]:
    """Quantize a safetensors model folder into ``target`` (MLX's layout): every 2-D
    ``.weight`` whose inputs fill whole groups, scales in float16; the rest kept. Written
    under a temporary name and renamed, so an interrupted run leaves nothing behind.
    Returns {"quantized": modules, "kept": tensors}."""
    fmt = QuantFormat(bits, group_size, "float16")
    source, target = Path(source), Path(target)
    config = store.read_json(source / "config.json")
    if quantization(config) is not None:
        raise NotAModelError(f"{source} is already quantized")
    if target.exists():
        raise ModelExistsError(f"{target} already exists; remove it or pick another destination")
    partial = target.with_name(f".partial-{target.name}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*KEPT))
    counts = {"quantized": 0, "kept": 0}
    try:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        tied = bool(config.get("tie_word_embeddings"))
        for name, array in iter_tensors(source):
            if tied and name == "lm_head.weight":
                continue                    # a copy of the embeddings the model does not read
            if array.ndim == 2 and name.endswith(".weight") and array.shape[1] % group_size == 0 \
                    and array.shape[1] % 32 == 0:
                stored = quant.quantize(np.asarray(array, np.float32), bits, group_size).packed()
                stored = {leaf: a if leaf == "weight" else a.astype(np.float16) for leaf, a in stored.items()}
                parts = {f"{name.removesuffix('.weight')}.{leaf}": a for leaf, a in stored.items()}
                counts["quantized"] += 1
            else:
                parts = {name: np.ascontiguousarray(array)}
                counts["kept"] += 1
            for key, value in parts.items():
                if size + value.nbytes > SHARD_BYTES and shards[-1]:
                    shards.append({})
                    size = 0
                shards[-1][key] = value
                size += value.nbytes
        _save(partial, shards)
        block = {"group_size": fmt.group_size, "bits": fmt.bits}
        (partial / "config.json").write_text(json.dumps({**config, "quantization": block,
                                                         "quantization_config": block}, indent=2))
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return counts


def _save(folder: Path, shards: list[dict[str, np.ndarray]]) -> None:
    from safetensors.numpy import save_file

    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for shard in shards for a in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

