"""The MLX backend: the families in mlx.nn (mrs/mlx), caches with host-side lengths
(mrs/mlx/cache.py), the MLX sampler and lazily evaluated steps, behind the protocol of
mrs/backends. On Apple silicon it runs on the GPU; on Linux, ``mlx[cpu]`` runs the same
code on the CPU (slowly: it is there for correctness).

``load`` builds the family's MLX module (MLX allocates nothing until evaluated),
swaps quantized projections in where the checkpoint or ``quantize`` asks, reads the
checkpoint against the module's parameter spec with the family's map (the JAX
backend's names and shapes) and evaluates the weights once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mrs import quant
from mrs.backends.mlx.pooling import pool
from mrs.backends.mlx.steps import MlxSteps
from mrs.engine.shapes import step_positions
from mrs.errors import InvalidParameterError, MrsError
from mrs.families import Family
from mrs.mlx import model_class
from mrs.mlx.cache import KVCache
from mrs.mlx.layers import swap_linears
from mrs.mlx.quantized import quantized_variant, runs_on_mlx
from mrs.quant import QuantFormat
from mrs.weights import ParamSpec, dense_param_count, is_stored_as_is, load_params

NAME = "mlx"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32, mx.int32: np.int32}


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def pick_dtype(dtype: str | None) -> Any:
    """'auto' is float32 on the CPU and bfloat16 on the GPU."""
    dtype = dtype or "auto"
    if dtype == "auto":
        return mx.bfloat16 if on_gpu() else mx.float32
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", dtype, f"one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def quantized_kernel(device: str | None = None) -> str | None:
    """MLX's own quantized matmul runs everywhere MLX does."""
    return "mlx"


def quantized_kernel_reason(device: str | None = None) -> str | None:
    return None


def runs_format(fmt: QuantFormat) -> bool:
    """Whether MLX's kernels run this format (groups of 32, 64 or 128); mrs.load reads the
    others (GGUF's Q6_K, groups of 16) dequantized."""
    return runs_on_mlx(fmt)


def quantizable(model: Any, fmt: QuantFormat) -> dict[str, QuantFormat]:
    """{module path: format} for every projection ``fmt`` (or 32-wide groups) can quantize."""
    found: dict[str, QuantFormat] = {}

    def visit(path: str, layer: Any) -> None:
        fitted = fmt.fitting(int(layer.weight.shape[-1]))
        if fitted is not None:
            found[path] = fitted

    swap_linears(model, visit)
    return found


def param_spec(model: Any) -> dict[str, ParamSpec]:
    """{dotted name: ParamSpec} of a module's parameters (floats mean the compute dtype,
    except quantized scales, which keep theirs)."""
    spec = {}
    for name, value in tree_flatten(model.parameters()):
        keep = name.endswith((".scales", ".biases"))
        dtype = _NUMPY.get(value.dtype, np.float32) if keep or not mx.issubdtype(value.dtype, mx.floating) \
            else np.float32
        spec[name] = ParamSpec(tuple(value.shape), dtype, (), keep)
    return spec


def load(path: Path, family: Family, config: Any, *, dtype: str | None = None, device: str | None = None,
         checkpoint: Any = None, quantized: Mapping[str, QuantFormat] | None = None,
         quantize: QuantFormat | None = None) -> MlxRunner:
    """The model in folder ``path`` (or the ``checkpoint`` stream) on MLX's default device.

    ``quantized`` names the projections whose checkpoint tensors arrive in mrs's quantized
    format (only formats ``runs_format`` accepts); ``quantize`` quantizes every other
    projection it fits as it is read."""
    mdtype = pick_dtype(dtype)
    model_cls = model_class(family.name)
    model = model_cls(config, dtype=mdtype)
    formats = dict(quantized or {})
    unrunnable = sorted(f"{p} ({f})" for p, f in formats.items() if not runs_format(f))
    if unrunnable:
        raise MrsError(f"MLX cannot run these quantized formats: {', '.join(unrunnable[:3])}; "
                       "read them dequantized (mrs.load does)")
    at_load = {p: f for p, f in quantizable(model, quantize).items() if p not in formats} if quantize else {}
    formats.update(at_load)
    dense_spec = param_spec(model)
    if formats:
        swap_linears(model, quantized_variant(formats))
    spec = param_spec(model)
    read_spec = dict(spec)
    for module, fmt in at_load.items():               # read dense, quantize in place
        del read_spec[f"{module}.scales"], read_spec[f"{module}.biases"]
        read_spec[f"{module}.weight"] = dense_spec[f"{module}.weight"]
    key_map = family.checkpoint_map(config)

    def place(name: str, value: np.ndarray, want: ParamSpec) -> Any:
        module, _, leaf = name.rpartition(".")
        if module in at_load and leaf == "weight":
            fmt = at_load[module]
            matrix = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
            stored = quant.quantize(matrix, fmt.bits, fmt.group_size).packed(fmt)
            return {f"{module}.{k}": mx.array(a.reshape(value.shape[:-1] + a.shape[-1:])) for k, a in stored.items()}
        if is_stored_as_is(want):
            return mx.array(np.asarray(value, want.dtype))
        host = np.asarray(value)
        if host.dtype not in (np.float32, np.float16):
            host = host.astype(np.float32)
        return mx.array(host).astype(mdtype)

    read = load_params(path if checkpoint is None else checkpoint, read_spec, np.float32, rename=key_map.rename,
                       ignore=key_map.ignored, fused=key_map.fused, place=place)
    arrays: dict[str, Any] = {}
    for name, value in read.items():
        arrays.update(value if isinstance(value, dict) else {name: value})
    model.update(tree_unflatten(list(arrays.items())))
    mx.eval(model.parameters())
    return MlxRunner(family, config, model_cls, model, spec, mdtype, formats)


class MlxRunner:
    """One model on MLX (the Runner of mrs/backends)."""

    backend = NAME

    def __init__(self, family: Family, config: Any, model_cls: Any, model: Any, spec: dict[str, ParamSpec],
                 dtype: Any, formats: Mapping[str, QuantFormat] | None = None):
        self.family, self.config, self.model_cls, self.model = family, config, model_cls, model
        self.spec, self.dtype = spec, dtype
        self.formats = dict(formats or {})
        self.vocab_size = int(getattr(config, "vocab_size", 0))
        self._steps: dict[int, MlxSteps] = {}

    @property
    def device_name(self) -> str:
        return f"mlx:{'gpu' if on_gpu() else 'cpu'}"

    @property
    def on_accelerator(self) -> bool:
        return on_gpu()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).rpartition(".")[2]

    @property
    def num_params(self) -> int:
        """Parameters as the dense model counts them (a quantized matrix's weights, not its words)."""
        return dense_param_count(self.spec, self.formats)

    @property
    def weight_bytes(self) -> int:
        return sum(int(v.nbytes) for _, v in tree_flatten(self.model.parameters()))

    @property
    def quantization(self) -> dict[str, int]:
        return dict(Counter(str(f) for f in self.formats.values()))

    # --- caches ---------------------------------------------------------------------

    def new_cache(self, slots: int, max_len: int) -> Any:
        # Evaluated here: MLX runs an unevaluated array on the stream of the thread that made
        # it, and the continuous batcher steps caches in a thread of its own.
        cache = self.model_cls.init_cache(self.config, slots, max_len, self.dtype)
        mx.eval(cache.arrays())
        return cache

    def cache_max_len(self, cache: Any) -> int:
        return int(cache.max_len)

    def cache_lengths(self, cache: Any) -> np.ndarray:
        return cache.lengths.copy()

    def with_lengths(self, cache: Any, lengths: np.ndarray) -> Any:
        fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)}
        fields = {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}
        cache = type(cache)(**{**fields, "lengths": np.asarray(lengths, np.int32).copy()})
        mx.eval(cache.arrays())          # finished before another thread (the batcher's) steps it
        return cache

    def rewindable(self, cache: Any) -> bool:
        return isinstance(cache, KVCache)

    # --- steps ----------------------------------------------------------------------

    def steps(self, num_top: int = 0) -> MlxSteps:
        if num_top not in self._steps:
            self._steps[num_top] = MlxSteps(self.model, self.vocab_size, num_top)
        return self._steps[num_top]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        batch, seq = tokens.shape
        cache = self.new_cache(batch, seq)
        positions = step_positions(np.zeros((batch,), np.int32), np.full((batch,), seq, np.int32), seq)
        logits, _ = self.model(mx.array(np.asarray(tokens, np.int32)), positions, cache)
        return np.array(logits.astype(mx.float32))

    def embed(self, tokens: np.ndarray, mask: np.ndarray, pooling: Any) -> np.ndarray:
        mask = mx.array(np.asarray(mask, bool))
        hidden = self.model(mx.array(np.asarray(tokens, np.int32)), mask)
        return np.array(pool(hidden, mask, pooling))

    def compiled_count(self) -> int:
        return 0

