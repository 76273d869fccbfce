"""Where a JAX model's arrays live: one device, or a tensor-parallel mesh (mrs/shard.py's plan).

A ``Layout`` is what the loader, the caches and the steps ask: where a parameter goes as
it is read (``place``), where small host inputs go (``put``: tokens, sampling rows,
masks, replicated on every device), how a cache is laid out (``cache_shardings``), and the
constraints a step puts on what it returns (``constrain_cache``, ``replicate``), so each
step hands back its cache exactly as the next one takes it and nothing recompiles.

Each split projection runs under ``shard_map`` (``ShardedLinear`` and kin): q/k/v and gate/up
split by output columns, o_proj/down_proj by input rows, whose partial sums one all-reduce
completes. XLA's SPMD partitioner places everything between them (attention per head,
norms, the lookup, sampling); no weight is ever gathered (tests/test_shard.py reads the
compiled steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrs import shard
from mrs.archs.layers import Embedding, Linear, project, register_projection
from mrs.archs.quantized import QuantEmbedding, QuantLinear
from mrs.errors import MrsError
from mrs.kernels.qmatmul import qmatmul


class Layout:
    """One device (``plan.devices == 1``) or a 1-D mesh named ``model`` over the first
    ``plan.devices`` devices of ``device``'s platform."""

    def __init__(self, plan: shard.Plan, device: jax.Device):
        self.plan, self.device = plan, device
        self.mesh: Mesh | None = None
        if plan.devices > 1:
            available = jax.devices(device.platform)
            if len(available) < plan.devices:
                raise MrsError(
                    f"tensor_parallel={plan.devices} needs {plan.devices} {device.platform} devices; this machine "
                    f"has {len(available)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                    "simulates more)")
            kwargs = {}
            axis_type = getattr(jax.sharding, "AxisType", None)
            if axis_type is not None:       # Auto: the partitioner places what the rules leave open
                kwargs["axis_types"] = (axis_type.Auto,)
            self.mesh = Mesh(np.array(available[:plan.devices]), (shard.AXIS,), **kwargs)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    @property
    def devices(self) -> int:
        return self.plan.devices

    @property
    def device_list(self) -> tuple[jax.Device, ...]:
        """Every device the model runs on, in the mesh's order."""
        return (self.device,) if self.mesh is None else tuple(self.mesh.devices.flat)

    def __repr__(self) -> str:
        return f"Layout({self.plan.devices} x {self.device.platform})"

    # shardings -------------------------------------------------------------------------

    def sharding(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device)
        return NamedSharding(self.mesh, PartitionSpec(*self.plan.spec(tuple(axes), tuple(shape))))

    @property
    def replicated(self) -> Any:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device)
        return NamedSharding(self.mesh, PartitionSpec())

    def cache_shardings(self, cache: Any) -> Any:
        """The cache pytree with each leaf replaced by its sharding (by the class's ``AXES``)."""
        fields = {}
        for name, axes in type(cache).AXES.items():
            fields[name] = jax.tree_util.tree_map(lambda x, axes=axes: self.sharding(axes, x.shape),
                                                  getattr(cache, name))
        return dataclasses.replace(cache, **fields)

    # placing ---------------------------------------------------------------------------

    def place(self, value: np.ndarray, axes: tuple[str, ...], dtype: Any,
              spec_shape: tuple[int, ...] | None = None) -> jax.Array:
        """A checkpoint tensor on its device(s), cast to ``dtype``. ``spec_shape`` is the shape
        that decides the split when it is not the tensor's own: a quantized weight's codes,
        scales and biases all split as its scales do, so each device holds whole groups."""
        if self.mesh is None:
            with jax.default_device(self.device):   # cast on the device, one tensor at a time
                return jnp.asarray(value, dtype=dtype)
        host = np.asarray(value)
        if host.dtype != jnp.dtype(dtype):
            host = host.astype(jnp.dtype(dtype))
        return self._global(host, self.sharding(axes, spec_shape or host.shape))

    @staticmethod
    def _global(host: np.ndarray, sharding: Any) -> jax.Array:
        """A host array placed by ``sharding``; across processes (mrs/mirror.py) each puts
        only its own devices' blocks, all from the same value."""
        if jax.process_count() == 1:
            return jax.device_put(host, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    @staticmethod
    def host(x: Any) -> np.ndarray:
        """A replicated array back on the host: from this process's own copy when the array
        also lives on other processes' devices (their copies are the same)."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    def put(self, x: Any) -> jax.Array:
        """A small host input (tokens, sampling rows, masks) where every device sees it."""
        if self.mesh is None:
            with jax.default_device(self.device):
                return jnp.asarray(x)
        return self._global(np.asarray(x), self.replicated)

    def new_cache(self, init: Any) -> Any:
        """``init()``'s cache, built straight into its shardings (no device holds all of it)."""
        if self.mesh is None:
            with jax.default_device(self.device):
                return init()
        abstract = jax.eval_shape(init)
        return jax.tree_util.tree_map(lambda a, s: self._global(np.zeros(a.shape, a.dtype), s),
                                      abstract, self.cache_shardings(abstract))

    # inside a step ---------------------------------------------------------------------

    def constrain_cache(self, cache: Any) -> Any:
        if self.mesh is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings(cache))

    def replicate(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, jax.tree_util.tree_map(lambda _: self.replicated, tree))


@register_projection
class ShardedLinear(nnx.Module):
    """A dense Linear split over the mesh, each device multiplying only its own block.

    Under ``shard_map`` each device contracts its block of the weight as the 2-D matrix it is
    in memory (``project``), and a split input ends in one all-reduce of the partial sums.
    Left to the partitioner, a weight whose split axis is not its first (gate/up [2, F, D]
    split on F) is sliced per part into fresh weight-sized copies on every call: a 2-layer
    1B-wide decode step ran 5x slower."""

    def __init__(self, dense: Linear, mesh: Mesh, spec: tuple[str | None, ...]):
        self.weight, self.bias = dense.weight, dense.bias
        self.mesh, self.spec = mesh, tuple(spec)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _split_matmul(project, x, (self.weight[...],), self.mesh, self.spec)
        return y + self.bias[...] if self.bias is not None else y


@register_projection
class ShardedEmbedding(Embedding):
    """Embeddings split over the vocabulary: the lookup is left to the partitioner (each
    device answers for its rows, one all-reduce), the tied head runs per device."""

    def __init__(self, dense: Embedding, mesh: Mesh, spec: tuple[str | None, ...]):
        self.weight = dense.weight
        self.mesh, self.spec = mesh, tuple(spec)

    def attend(self, x: jax.Array) -> jax.Array:
        return _split_matmul(project, x, (self.weight[...],), self.mesh, self.spec)


def _split_matmul(local_matmul: Any, x: jax.Array, weights: tuple[jax.Array, ...], mesh: Mesh,
                  spec: tuple[str | None, ...]) -> jax.Array:
    """x [..., K] . W [*out, K] (given as its arrays: a dense weight, or codes, scales and
    biases), W's dimensions split as ``spec`` says: each device runs ``local_matmul`` on its
    block; a split K (row parallel) ends in one all-reduce."""
    lead = (None,) * (x.ndim - 1)
    rows_split = spec[-1] is not None

    def local(x, *w):
        y = local_matmul(x, *w)
        return jax.lax.psum(y, shard.AXIS) if rows_split else y

    split = PartitionSpec(*spec)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(*lead, spec[-1]),) + (split,) * len(weights),
                         out_specs=PartitionSpec(*lead, *spec[:-1]))(x, *weights)


@register_projection
class ShardedQuantLinear(QuantLinear):
    """A quantized Linear split over the mesh, its kernel run on each device's own slice.

    XLA cannot split a custom call (the CPU kernel), so left to the partitioner every device
    would gather the whole weight. Under ``shard_map`` each device runs the kernel on its
    rows (split outputs: column parallel) or its input groups (split inputs: row parallel,
    then one all-reduce of the partial sums)."""

    def __init__(self, quant: QuantLinear, mesh: Mesh, spec: tuple[str | None, ...]):
        self.weight, self.scales, self.biases, self.bias = quant.weight, quant.scales, quant.biases, quant.bias
        self.bits, self.kernel, self.format = quant.bits, quant.kernel, quant.format
        self.in_features = quant.in_features
        self.mesh, self.spec = mesh, tuple(spec)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _split_qmatmul(x, self.weight[...], self.scales[...], self.biases[...], self.bits, self.kernel,
                           self.mesh, self.spec)
        return y + self.bias[...] if self.bias is not None else y


@register_projection
class ShardedQuantEmbedding(QuantEmbedding):
    """A quantized embedding split over the vocabulary: the lookup is left to the partitioner
    (it masks each device's rows), the tied head runs the kernel per device as above."""

    def __init__(self, quant: QuantEmbedding, mesh: Mesh, spec: tuple[str | None, ...]):
        self.weight, self.scales, self.biases = quant.weight, quant.scales, quant.biases
        self.bits, self.kernel, self.dtype = quant.bits, quant.kernel, quant.dtype
        self.in_features, self.format = quant.in_features, quant.format
        self.mesh, self.spec = mesh, tuple(spec)

    def attend(self, x: jax.Array) -> jax.Array:
        return _split_qmatmul(x, self.weight[...], self.scales[...], self.biases[...], self.bits, self.kernel,
                              self.mesh, self.spec)


def _split_qmatmul(x: jax.Array, w: jax.Array, s: jax.Array, b: jax.Array, bits: int, kernel: str, mesh: Mesh,
                   spec: tuple[str | None, ...]) -> jax.Array:
    """x [..., K] . W [*out, K] quantized (codes, scales, biases split alike)."""

    def local(x, w, s, b):
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        y = qmatmul(x, flat(w), flat(s), flat(b), bits=bits, kernel=kernel)
        return y.reshape(x.shape[:-1] + w.shape[:-1])

    return _split_matmul(local, x, (w, s, b), mesh, spec)


def split_variant(layout: Layout):
    """A ``swap_linears`` variant: each projection the plan splits (dense or quantized) runs
    per device; one it leaves whole on every device stays as it is."""

    def variant(path: str, layer: Any) -> nnx.Module | None:
        kinds = {Linear: ShardedLinear, Embedding: ShardedEmbedding,
                 QuantLinear: ShardedQuantLinear, QuantEmbedding: ShardedQuantEmbedding}
        cls = kinds.get(type(layer))
        if cls is None:
            return None
        # A quantized weight splits as its scales do: whole groups per device.
        decides = layer.scales if isinstance(layer, (QuantLinear, QuantEmbedding)) else layer.weight
        spec = layout.plan.spec(tuple(decides.get_metadata().get("axes") or ()), tuple(decides.shape))
        if all(s is None for s in spec):
            return None
        return cls(layer, layout.mesh, spec)

    return variant
