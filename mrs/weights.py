"""safetensors checkpoints (single file or sharded) -> a flat {name: array} of params.

Backend-free: tensors are read as numpy through safetensors' memory map, one at a time,
checked against a spec (shape, dtype, logical axes per parameter) and handed to a
``place`` callback, the one place where a backend casts, quantizes, shards and puts
them on its device. So peak host memory stays near one tensor beyond the result.
Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open

from mrs.errors import WeightsError

INDEX = "model.safetensors.index.json"


class Spec(Protocol):
    """What load_params needs to know of a parameter (ParamSpec, jax.ShapeDtypeStruct, an array)."""

    shape: tuple[int, ...]
    dtype: Any


@dataclass(frozen=True)
class ParamSpec:
    """One model parameter: its shape, dtype and logical axis names (one per dimension).

    Floating dtypes mean "the compute dtype" (the checkpoint is cast to it) unless
    ``keep_dtype`` (a quantized weight's scales); integer dtypes are stored as they are,
    so packed quantized codes are legal entries.
    """

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...] = ()
    keep_dtype: bool = False

    def __post_init__(self):
        if self.axes and len(self.axes) != len(self.shape):
            raise ValueError(f"axes {self.axes} do not name every dimension of shape {self.shape}")


@dataclass(frozen=True)
class Fused:
    """One model tensor stacked from several checkpoint tensors along ``axis``.

    ``parts`` are (module path, leading shape): each checkpoint tensor's first (output)
    axis is reshaped to that leading shape, its other axes kept, and the parts are
    concatenated along ``axis``: ``Fused(1, (("self_attn.q_proj", (K, G, H)), ...))``
    turns q/k/v [rows, D] into [K, G + 2, H, D]. Module paths match in any layer, for
    both ``.weight`` and ``.bias``.
    """

    axis: int
    parts: tuple[tuple[str, tuple[int, ...]], ...]


def dense_param_count(spec: Mapping[str, Spec], formats: Mapping[str, Any]) -> int:
    """Parameters as the dense model counts them: a quantized module's (``formats``: module
    path -> mrs.quant.QuantFormat) packed weight counts its codes, its scales and biases nothing."""
    total = 0
    for name, want in spec.items():
        module, _, leaf = name.rpartition(".")
        fmt = formats.get(module)
        if fmt is not None and leaf == "weight":
            total += prod(want.shape) * 32 // fmt.bits
        elif fmt is None or leaf not in ("scales", "biases"):
            total += prod(want.shape)
    return total


def is_stored_as_is(spec: Spec) -> bool:
    """Integer and bool tensors (token types, packed codes) and ``keep_dtype`` ones keep
    their dtype; other floats are cast to the compute dtype."""
    return np.dtype(spec.dtype).kind in "iub" or bool(getattr(spec, "keep_dtype", False))


def cast_to(value: np.ndarray, spec: Spec, dtype: Any) -> np.ndarray:
    """The numpy array for ``spec``: floats in ``dtype``, the rest as the spec says."""
    return np.asarray(value, dtype=spec.dtype if is_stored_as_is(spec) else dtype)


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
    folder: Path | Iterable[tuple[str, np.ndarray]],
    expected: Mapping[str, Spec],
    dtype: Any,
    rename: Callable[[str, np.ndarray], Iterator[tuple[str, np.ndarray]]] | None = None,
    ignore: Callable[[str], bool] = lambda name: False,
    tied: Mapping[str, str] | None = None,
    fused: Mapping[str, Fused] | None = None,
    place: Callable[[str, np.ndarray, Spec], Any] | None = None,
) -> dict[str, Any]:
    """Read the checkpoint into arrays for exactly the names and shapes in ``expected``.

    ``rename`` maps one checkpoint tensor to zero or more model tensors (a family's
    key map); ``ignore`` names checkpoint tensors that are fine to drop (buffers such
    as rotary ``inv_freq``); ``tied`` fills a missing name from another (tied embeddings);
    ``fused`` builds one model tensor from several checkpoint tensors (see ``Fused``).
    A model tensor may also split a checkpoint tensor's first axis into several (a
    [2F, D] ``gate_up_proj`` into [2, F, D]). Each tensor goes through
    ``place(name, array, spec)``; the default casts floats to ``dtype`` in numpy.
    ``folder`` is a safetensors folder, or any iterable of (checkpoint name, array) pairs
    (a GGUF file's tensors; its ``str`` names it in errors).
    """
    place = place or (lambda name, value, spec: cast_to(value, spec, dtype))
    params: dict[str, Any] = {}
    unexpected: list[str] = []
    parts = _FusedParts(fused or {}, expected)
    stream = iter_tensors(folder) if isinstance(folder, (str, Path)) else iter(folder)
    for ckpt_name, array in stream:
        pairs = rename(ckpt_name, array) if rename else [(ckpt_name, array)]
        for name, value in pairs:
            if parts.add(name, ckpt_name, value):
                continue
            if name not in expected:
                if not ignore(ckpt_name):
                    unexpected.append(ckpt_name)
                continue
            want = expected[name]
            params[name] = place(name, _fit(ckpt_name, value, tuple(want.shape), name), want)
    for name, value in parts.complete():
        params[name] = place(name, value, expected[name])
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


def _fit(ckpt_name: str, value: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``value`` in the model's shape: as it is, or with its first axis split (see load_params)."""
    split = len(shape) - value.ndim + 1
    if (value.ndim and len(shape) > value.ndim and tuple(value.shape[1:]) == shape[split:]
            and value.shape[0] == prod(shape[:split])):
        return value.reshape(shape)
    _check_shape(ckpt_name, value, shape, name)
    return value


def _check_shape(ckpt_name: str, value: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(value.shape) != shape:
        raise WeightsError(
            f"tensor {ckpt_name} has shape {tuple(value.shape)}, but this config expects "
            f"{shape} for {name} — does config.json match the weights?"
        )


def module_prefix(module: str, suffix: str) -> str | None:
    """"model.layers.0." for module "model.layers.0.mlp.up_proj" and suffix "mlp.up_proj"; None if no match."""
    if module == suffix:
        return ""
    return module[: len(module) - len(suffix)] if module.endswith("." + suffix) else None


class _FusedParts:
    """Collects the checkpoint tensors that load_params stacks into one model tensor."""

    def __init__(self, fused: Mapping[str, Fused], expected: Mapping[str, Any]):
        self.fused, self.expected = fused, expected
        self.found: dict[str, dict[int, np.ndarray]] = {}

    def _parts_of(self, name: str) -> tuple[str, Fused, str] | None:
        """(module prefix, spec, leaf) when ``name`` is a fused model tensor."""
        module, _, leaf = name.rpartition(".")
        for target, spec in self.fused.items():
            prefix = module_prefix(module, target)
            if prefix is not None:
                return prefix, spec, leaf
        return None

    def add(self, name: str, ckpt_name: str, value: np.ndarray) -> bool:
        """Keep ``name`` if it is one part of a fused tensor the model expects."""
        module, _, leaf = name.rpartition(".")
        for target, spec in self.fused.items():
            for index, (part, lead) in enumerate(spec.parts):
                prefix = module_prefix(module, part)
                if prefix is None:
                    continue
                fused_name = f"{prefix}{target}.{leaf}"
                if fused_name not in self.expected:
                    return False
                rest = tuple(self.expected[fused_name].shape[len(lead):])
                _check_shape(ckpt_name, value, (prod(lead),) + rest, f"{fused_name} part {index}")
                self.found.setdefault(fused_name, {})[index] = value.reshape(tuple(lead) + rest)
                return True
        return False

    def complete(self) -> Iterator[tuple[str, np.ndarray]]:
        """Each fused tensor whose parts all arrived, stacked in the parts' order."""
        for name, found in self.found.items():
            _, spec, _ = self._parts_of(name)
            if len(found) == len(spec.parts):
                yield name, np.concatenate([found[i] for i in range(len(spec.parts))], axis=spec.axis)

    def checkpoint_names(self, missing: set[str]) -> Iterator[str]:
        """Missing model tensors as the checkpoint names a user can look for."""
        for name in missing:
            found_spec = self._parts_of(name)
            if found_spec is None:
                yield name
                continue
            prefix, spec, leaf = found_spec
            found = self.found.get(name, {})
            yield from (f"{prefix}{part}.{leaf}" for i, (part, _) in enumerate(spec.parts) if i not in found)
