"""safetensors checkpoints (single file or sharded) -> a flat {name: array} of params.

Tensors are read through safetensors' memory map one at a time and cast straight to
the target dtype, so peak host memory stays near one tensor beyond the result.
Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from mrs.errors import WeightsError

INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e}") from e
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise WeightsError(f"shard {file.name} listed in {INDEX} is missing from {folder}")
        return files
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise WeightsError(
                f"{folder} only has pickle checkpoints ({', '.join(pickles)}); mrs refuses them because "
                "unpickling can run arbitrary code — convert to safetensors first"
            )
        raise WeightsError(f"no *.safetensors files in {folder}")
    files: dict[str, Path] = {}
    for file in singles:
        for name in _open(file, ExitStack()).keys():
            files[name] = file
    return files


def _open(file: Path, stack: ExitStack):
    try:
        return stack.enter_context(safe_open(str(file), framework="numpy"))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"cannot read {file.name}: {e} (truncated or corrupt download? pull it again)") from e


def iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor in the checkpoint, memory-mapped."""
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_files(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with ExitStack() as stack:
            handle = _open(file, stack)
            available = set(handle.keys())
            for name in names:
                if name not in available:
                    raise WeightsError(f"tensor {name} is listed in the index but missing from {file.name}")
                try:
                    yield name, handle.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise WeightsError(f"cannot read tensor {name} from {file.name}: {e}") from e


def load_params(
    folder: Path,
    expected: Mapping[str, jax.ShapeDtypeStruct],
    dtype: jnp.dtype,
    rename: Callable[[str, np.ndarray], Iterator[tuple[str, np.ndarray]]] | None = None,
    ignore: Callable[[str], bool] = lambda name: False,
    tied: Mapping[str, str] | None = None,
    fused: Mapping[str, Sequence[tuple[str, int]]] | None = None,
) -> dict[str, jax.Array]:
    """Read the checkpoint into arrays for exactly the names and shapes in ``expected``.

    ``rename`` maps one checkpoint tensor to zero or more model tensors (a family's
    key map); ``ignore`` names checkpoint tensors that are fine to drop (buffers such
    as rotary ``inv_freq``); ``tied`` fills a missing name from another (tied embeddings);
    ``fused`` builds one model tensor from several checkpoint tensors stacked along
    their first axis, ``{"self_attn.qkv_proj": [("self_attn.q_proj", rows), ...]}``
    (module paths, matched in any layer, for both ``.weight`` and ``.bias``).
    Float tensors are cast to ``dtype``; others keep theirs.
    """
    params: dict[str, jax.Array] = {}
    unexpected: list[str] = []
    parts = _FusedParts(fused or {}, expected)
    for ckpt_name, array in iter_tensors(folder):
        pairs = rename(ckpt_name, array) if rename else [(ckpt_name, array)]
        for name, value in pairs:
            if parts.add(name, ckpt_name, value):
                continue
            if name not in expected:
                if not ignore(ckpt_name):
                    unexpected.append(ckpt_name)
                continue
            want = expected[name]
            _check_shape(ckpt_name, value, tuple(want.shape), name)
            params[name] = jnp.asarray(value, dtype=_target_dtype(want, dtype))
    for name, value in parts.complete():
        params[name] = jnp.asarray(value, dtype=_target_dtype(expected[name], dtype))
    for name, source in (tied or {}).items():
        if name not in params and source in params:
            params[name] = params[source]
    missing = sorted(parts.checkpoint_names(set(expected) - set(params)))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"checkpoint in {folder} is missing tensors: {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(
            f"checkpoint in {folder} has tensors this architecture does not use: "
            f"{', '.join(sorted(unexpected)[:5])}{more} — is config.json the right one?"
        )
    return params


def _target_dtype(want: jax.ShapeDtypeStruct, dtype: jnp.dtype) -> jnp.dtype:
    return dtype if jnp.issubdtype(want.dtype, jnp.floating) else want.dtype


def _check_shape(ckpt_name: str, value: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(value.shape) != shape:
        raise WeightsError(
            f"tensor {ckpt_name} has shape {tuple(value.shape)}, but this config expects "
            f"{shape} for {name} — does config.json match the weights?"
        )


def _prefix(module: str, suffix: str) -> str | None:
    """"model.layers.0." for module "model.layers.0.mlp.up_proj" and suffix "mlp.up_proj"; None if no match."""
    if module == suffix:
        return ""
    return module[: len(module) - len(suffix)] if module.endswith("." + suffix) else None


class _FusedParts:
    """Collects the checkpoint tensors that load_params stacks into one model tensor."""

    def __init__(self, fused: Mapping[str, Sequence[tuple[str, int]]], expected: Mapping[str, Any]):
        self.fused, self.expected = fused, expected
        self.found: dict[str, dict[int, np.ndarray]] = {}

    def _parts_of(self, name: str) -> tuple[str, Sequence[tuple[str, int]], str] | None:
        """(module prefix, parts, leaf) when ``name`` is a fused model tensor."""
        module, _, leaf = name.rpartition(".")
        for target, parts in self.fused.items():
            prefix = _prefix(module, target)
            if prefix is not None:
                return prefix, parts, leaf
        return None

    def add(self, name: str, ckpt_name: str, value: np.ndarray) -> bool:
        """Keep ``name`` if it is one part of a fused tensor the model expects."""
        module, _, leaf = name.rpartition(".")
        for target, parts in self.fused.items():
            for index, (part, rows) in enumerate(parts):
                prefix = _prefix(module, part)
                if prefix is None:
                    continue
                fused_name = f"{prefix}{target}.{leaf}"
                if fused_name not in self.expected:
                    return False
                shape = (rows,) + tuple(self.expected[fused_name].shape[1:])
                _check_shape(ckpt_name, value, shape, f"{fused_name} rows {index}")
                self.found.setdefault(fused_name, {})[index] = value
                return True
        return False

    def complete(self) -> Iterator[tuple[str, np.ndarray]]:
        """Each fused tensor whose parts all arrived, stacked in the parts' order."""
        for name, found in self.found.items():
            _, parts, _ = self._parts_of(name)
            if len(found) == len(parts):
                yield name, np.concatenate([found[i] for i in range(len(parts))], axis=0)

    def checkpoint_names(self, missing: set[str]) -> Iterator[str]:
        """Missing model tensors as the checkpoint names a user can look for."""
        for name in missing:
            spec = self._parts_of(name)
            if spec is None:
                yield name
                continue
            prefix, parts, leaf = spec
            found = self.found.get(name, {})
            yield from (f"{prefix}{part}.{leaf}" for i, (part, _) in enumerate(parts) if i not in found)
