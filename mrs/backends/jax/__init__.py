"""The JAX backend: Flax NNX models (mrs/archs), KV/SSM cache pytrees (mrs/cache.py),
kernels (mrs/kernels) and jitted steps (steps.py) behind the protocol of mrs/backends.

``load`` builds the family's Flax module abstractly (no memory), lets a projection
variant replace chosen layers (``variant``, see ``archs.layers.swap_linears``), reads
the checkpoint against the resulting parameter spec (shape, dtype, logical axes), and
places each tensor on the device as it is read. The module is split once into a
graphdef and a pure param dict, so every step is a jitted function of the params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs import archs, quant, shard
from mrs.archs.layers import swap_linears
from mrs.archs.quantized import quantized_variant
from mrs.backends.jax import executables
from mrs.backends.jax.executables import StoredStep
from mrs.backends.jax.group import holds_device_values, share_token  # noqa: F401  (the protocol's)
from mrs.backends.jax.group import join as join_group  # noqa: F401
from mrs.backends.jax.layout import Layout, split_variant
from mrs.backends.jax.pooling import pool
from mrs.backends.jax.steps import CompiledSteps, JaxSteps, bind, shared_steps
from mrs.cache import KVCache
from mrs.engine.shapes import step_positions
from mrs.errors import InvalidParameterError, MrsError
from mrs.families import Family
from mrs.quant import QuantFormat
from mrs.weights import ParamSpec, dense_param_count, is_stored_as_is, load_params

NAME = "jax"
TENSOR_PARALLEL = True          # load(tensor_parallel=N): see mrs/shard.py and layout.py
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def pick_device(device: str | None) -> jax.Device:
    """'auto' | 'cpu' | 'gpu' | 'tpu' -> a JAX device, with a clear error if absent."""
    device = device or "auto"
    if device == "auto":
        return jax.devices()[0]
    try:
        return jax.devices(device)[0]
    except RuntimeError as e:
        raise MrsError(f"device {device!r} is not available here ({e}); use --device auto or cpu") from e


def pick_dtype(dtype: str | None, device: jax.Device) -> Any:
    """'auto' is float32 on CPU (XLA's bf16 on CPU is several times slower), else bfloat16."""
    dtype = dtype or "auto"
    if dtype == "auto":
        return jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", dtype, f"one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def param_spec(state: nnx.State) -> dict[str, ParamSpec]:
    """{dotted name: ParamSpec} of an abstract module's parameters, logical axes included."""
    spec = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        meta = var.get_metadata()
        spec[".".join(map(str, path))] = ParamSpec(tuple(value.shape), value.dtype, tuple(meta.get("axes") or ()),
                                                   bool(meta.get("keep_dtype", False)))
    return spec


Variant = Callable[[str, Any], nnx.Module | None]


def quantized_kernel(device: str | None = None) -> str | None:
    """The quantized-matmul kernel this device runs ("cpu": mrs's own; "xla": dequantize
    inside the step, fused by XLA on accelerators), or None where weights must be
    dequantized at load (a CPU with no C++ compiler)."""
    if pick_device(device).platform != "cpu":
        return "xla"
    from mrs.kernels.qmatmul import cpu_kernel_error

    return "cpu" if cpu_kernel_error() is None else None


def quantizable(model: nnx.Module, fmt: QuantFormat) -> dict[str, QuantFormat]:
    """{module path: format} for every projection ``fmt`` (or, where its inputs are not whole
    groups of it, 32-wide groups) can quantize."""
    found: dict[str, QuantFormat] = {}

    def visit(path: str, layer: Any) -> None:
        fitted = fmt.fitting(int(layer.weight.shape[-1]))
        if fitted is not None:
            found[path] = fitted

    swap_linears(model, visit)
    return found


def load(path: Path, family: Family, config: Any, *, dtype: str | None = None, device: str | None = None,
         variant: Variant | None = None, checkpoint: Any = None,
         quantized: Mapping[str, QuantFormat] | None = None, quantize: QuantFormat | None = None,
         tensor_parallel: int = 1) -> JaxRunner:
    """The model in folder ``path`` on a JAX device: params placed, steps ready to compile.

    ``checkpoint`` replaces the folder's safetensors with another stream of (name, array)
    pairs (a GGUF file's tensors). ``quantized`` names the projections (module path ->
    format) whose checkpoint tensors arrive quantized (``weight``, ``scales``, ``biases``);
    ``quantize`` quantizes every other projection it fits as its dense tensor is read.
    ``tensor_parallel`` splits the model over that many devices (mrs/shard.py): each tensor
    goes to its devices as it is read, kv heads repeated where they are fewer than them."""
    executables.store()             # before anything compiles: JAX's persistent cache joins mrs's
    dev = pick_device(device)
    jdtype = pick_dtype(dtype, dev)
    model_cls = archs.model_class(family.name)
    if jax.process_count() > 1 and tensor_parallel != jax.device_count():
        raise MrsError(f"in a group of {jax.process_count()} processes a model spans all {jax.device_count()} "
                       f"devices: --tensor-parallel {jax.device_count()}, not {tensor_parallel}")
    plan = shard.plan(config, tensor_parallel)
    layout = Layout(plan, dev)
    checkpoint_config, config = config, shard.running_config(config, plan)
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=jdtype))
    formats = dict(quantized or {})
    at_load = {p: f for p, f in quantizable(abstract, quantize).items() if p not in formats} if quantize else {}
    formats.update(at_load)
    kernel = None
    if formats:
        kernel = quantized_kernel(device)
        if kernel is None:
            raise MrsError("quantized weights cannot run here: the CPU kernel is not built "
                           f"({quantized_kernel_reason(device)}); load with dequantize=True")
        swap_linears(abstract, quantized_variant(formats, kernel))
    if variant is not None:
        swap_linears(abstract, variant)
    if layout.sharded:
        swap_linears(abstract, split_variant(layout))
    # What the graph computes, named the same in every process (a caller's variant cannot be).
    # One process's view cannot name a program that spans others' devices: those compile in each.
    identity = None if variant is not None or jax.process_count() > 1 else "\n".join((
        f"{model_cls.__module__}.{model_cls.__qualname__}", repr(config), jnp.dtype(jdtype).name,
        repr(sorted(formats.items())), str(kernel)) + ((repr(plan),) if layout.sharded else ()))
    # Its steps load from the cache while the weights are read.
    executables.prefetch(dev, identity, layout.device_list)
    graphdef, state = nnx.split(abstract)
    spec = param_spec(state)
    read_spec = dict(spec)          # what the checkpoint holds: dense weights where quantized at load
    for module, fmt in at_load.items():
        del read_spec[f"{module}.scales"], read_spec[f"{module}.biases"]
        codes = spec[f"{module}.weight"]
        dense = codes.shape[:-1] + (codes.shape[-1] * 32 // fmt.bits,)
        read_spec[f"{module}.weight"] = ParamSpec(dense, jdtype, codes.axes)
    repeated = _repeated_kv(read_spec, plan)    # fused q/k/v leaves: the checkpoint holds fewer kv heads
    for name in repeated:
        read_spec[name] = dataclasses.replace(read_spec[name], shape=shard.checkpoint_shape(read_spec[name].shape,
                                                                                             plan))
    key_map = family.checkpoint_map(checkpoint_config)

    def place(name: str, value: np.ndarray, want: ParamSpec) -> Any:
        module = name.rpartition(".")[0]
        # A quantized weight's leaves split as its scales do (whole groups per device).
        quantized_leaf = module in formats and name.rpartition(".")[2] in ("weight", "scales", "biases")
        split_as = spec[f"{module}.scales"].shape if quantized_leaf else None
        if name in repeated:
            value = shard.repeat_kv(np.asarray(value), plan.kv_repeat)
        if module in at_load and name.endswith(".weight"):
            fmt = at_load[module]
            matrix = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
            stored = quant.quantize(matrix, fmt.bits, fmt.group_size).packed(fmt)
            return {f"{module}.{leaf}": layout.place(a.reshape(value.shape[:-1] + a.shape[-1:]), want.axes, a.dtype,
                                                     split_as) for leaf, a in stored.items()}
        return layout.place(value, want.axes, want.dtype if is_stored_as_is(want) else jdtype, split_as)

    read = load_params(path if checkpoint is None else checkpoint, read_spec, jdtype, rename=key_map.rename,
                       ignore=key_map.ignored, fused=key_map.fused, place=place)
    arrays: dict[str, Any] = {}
    for name, value in read.items():
        arrays.update(value if isinstance(value, dict) else {name: value})
    flat = nnx.to_flat_state(state)
    for path_, var in flat:
        var.set_value(arrays[".".join(map(str, path_))])
    params = nnx.to_pure_dict(nnx.from_flat_state(flat))
    return JaxRunner(family, config, model_cls, graphdef, params, spec, jdtype, dev, formats, identity, layout)


def _repeated_kv(spec: Mapping[str, ParamSpec], plan: shard.Plan) -> set[str]:
    """The params whose kv heads the plan repeats at load (see mrs/shard.py), checked to be
    the fused q/k/v layout that repeating applies to."""
    if plan.kv_repeat == 1:
        return set()
    fused = {name for name, s in spec.items() if shard.is_fused_qkv(s.axes)}
    apart = [name for name, s in spec.items() if "kv_heads" in s.axes and name not in fused]
    if apart or not fused:
        raise MrsError(f"tensor_parallel={plan.devices} would repeat kv heads, which this model keeps apart "
                       f"({apart[0] if apart else 'no fused q/k/v'}); use a divisor of its kv heads")
    return fused


def lora_model(model: Any, settings: Any, *, seed: int = 0, remat: bool = False) -> Any:
    """Fine-tuning (optional in the protocol): ``model`` with LoRA factors on the projections
    ``settings`` (mrs.adapters.LoraSettings) target, split into trainable and frozen."""
    from mrs.backends.jax.lora import LoraModel

    if getattr(model.runner, "tensor_parallel", 1) != 1:
        raise MrsError("fine-tuning runs on one device: load the model without tensor_parallel")
    return LoraModel(model, settings, seed=seed, remat=remat)


def lora_trainer(lora: Any, options: Any) -> Any:
    """The optax trainer (jitted update, checkpoints) for a ``lora_model``."""
    from mrs.backends.jax.trainer import Trainer

    return Trainer(lora, options)


def quantized_kernel_reason(device: str | None = None) -> str | None:
    """Why ``quantized_kernel`` is None here (the CPU kernel did not build), else None."""
    if pick_device(device).platform != "cpu":
        return None
    from mrs.kernels.qmatmul import cpu_kernel_error

    return cpu_kernel_error()


class JaxRunner:
    """One model on a JAX device (the Runner of mrs/backends).

    ``params`` is a nested dict of arrays (``nnx.to_pure_dict`` of the module state): jit
    flattens a plain dict in C++, where NNX variables cost ~1.5 ms of Python per call on
    a 30-layer model — a few percent of a CPU decode step.
    """

    backend = NAME

    def __init__(self, family: Family, config: Any, model_cls: Any, graphdef: Any, params: dict,
                 spec: dict[str, ParamSpec], dtype: Any, device: jax.Device,
                 formats: Mapping[str, QuantFormat] | None = None, identity: str | None = None,
                 layout: Layout | None = None):
        self.family, self.config, self.model_cls = family, config, model_cls
        self.identity = identity        # see executables.StoredStep; None: compile in each process
        self.graphdef, self.params, self.spec = graphdef, params, spec
        self.formats = dict(formats or {})      # quantized projections: module path -> format
        self.dtype, self.device = dtype, device
        self.layout = layout or Layout(shard.Plan(1), device)
        self.vocab_size = int(getattr(config, "vocab_size", 0))
        self._steps: dict[int, JaxSteps] = {}
        self._compiled: dict[int, CompiledSteps] = {}
        self._encoders: dict[Any, Any] = {}

    @property
    def device_name(self) -> str:
        if self.layout.sharded:
            return f"{self.layout.devices} {self.device.platform} devices (tensor parallel)"
        return str(self.device)

    @property
    def tensor_parallel(self) -> int:
        return self.layout.devices

    @property
    def on_accelerator(self) -> bool:
        return self.device.platform != "cpu"

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name

    @property
    def num_params(self) -> int:
        """Parameters as the dense model counts them (a quantized matrix's weights, not its words)."""
        return dense_param_count(self.spec, self.formats)

    @property
    def weight_bytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self.params))

    @property
    def quantization(self) -> dict[str, int]:
        """{format: projections in it} (empty for a dense model)."""
        from collections import Counter

        return dict(Counter(str(f) for f in self.formats.values()))

    def module(self) -> nnx.Module:
        """The Flax module with these params, for experiments outside the engine."""
        return bind(self.graphdef, self.params)

    # --- caches ---------------------------------------------------------------------

    def new_cache(self, slots: int, max_len: int) -> Any:
        return self.layout.new_cache(lambda: self.model_cls.init_cache(self.config, slots, max_len, self.dtype))

    def cache_max_len(self, cache: Any) -> int:
        return int(cache.max_len)

    def cache_lengths(self, cache: Any) -> np.ndarray:
        return self.layout.host(cache.lengths)

    def with_lengths(self, cache: Any, lengths: np.ndarray) -> Any:
        return dataclasses.replace(cache, lengths=self.layout.put(np.asarray(lengths, np.int32)))

    def rewindable(self, cache: Any) -> bool:
        return isinstance(cache, KVCache)

    # --- steps ----------------------------------------------------------------------

    def compiled(self, num_top: int = 0) -> CompiledSteps:
        """The raw jitted functions (params first), for research code and benchmarks."""
        if num_top not in self._compiled:   # held here: the shared table only holds it weakly
            self._compiled[num_top] = shared_steps(self.graphdef, self.config, self.dtype, self.device,
                                                   self.vocab_size, num_top, self.identity, self.layout)
        return self._compiled[num_top]

    def steps(self, num_top: int = 0) -> JaxSteps:
        if num_top not in self._steps:
            self._steps[num_top] = JaxSteps(self.compiled(num_top), self.params)
        return self._steps[num_top]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        batch, seq = tokens.shape
        cache = self.new_cache(batch, seq)
        positions = step_positions(np.zeros((batch,), np.int32), np.full((batch,), seq, np.int32), seq)
        logits, _ = self.compiled(0).forward(self.params, np.asarray(tokens, np.int32), positions, cache)
        return self.layout.host(logits).astype(np.float32)

    def embed(self, tokens: np.ndarray, mask: np.ndarray, pooling: Any) -> np.ndarray:
        if pooling not in self._encoders:
            graphdef = self.graphdef

            def encode(params, tokens, mask):
                """tokens, mask [B, T] -> pooled [B, dim] float32."""
                return pool(bind(graphdef, params)(tokens, mask), mask, pooling)

            self._encoders[pooling] = StoredStep(f"encode {pooling!r}", jax.jit(encode), self.device, self.identity,
                                                 lambda a: f"the encoder over {a[1].shape[0]}x{a[1].shape[1]} tokens")
        pooled = self._encoders[pooling](self.params, np.asarray(tokens, np.int32), np.asarray(mask, bool))
        return self.layout.host(pooled).astype(np.float32)

    def compiled_count(self) -> int:
        return sum(f._cache_size() for f in self._encoders.values())
