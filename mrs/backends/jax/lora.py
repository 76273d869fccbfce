"""The JAX backend's LoRA: a loaded model with LoRA factors on its projections, split into what trains and what not.

``LoraModel(model, settings)`` takes an ``mrs.Model`` on the JAX backend (dense, or
quantized for QLoRA), wraps the projections the settings target in ``LoraLinear``
(mrs/archs/lora.py) and splits the module once: ``params`` (the A and B factors, a pure
dict) and ``frozen`` (the base weights). ``loss(params, frozen, batch, key)`` is a pure
function a researcher can replace; ``adapter(params)`` and ``load_adapter`` move the
factors to and from PEFT's format (mrs/adapters.py) by checkpoint module name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs import adapters
from mrs.adapters import Adapter, AdapterError, LoraSettings, Piece
from mrs.archs.layers import Linear, swap_linears
from mrs.archs.lora import LoraLinear, LoraParam, dropout_key, lora_variant
from mrs.archs.quantized import QuantLinear


def projection_pieces(model: Any, module: nnx.Module | None = None) -> dict[str, list[Piece]]:
    """{mrs module path: the checkpoint modules in it} for every linear projection."""
    cmap = model.family.checkpoint_map(model.config)
    found: dict[str, list[Piece]] = {}

    def visit(path: str, layer: Any) -> None:
        if isinstance(layer, (Linear, QuantLinear)):
            found[path] = adapters.pieces(cmap.fused, cmap.whole, path, tuple(layer.weight.shape[:-1]))

    swap_linears(module if module is not None else model.runner.module(), visit)
    return found


def default_targets(model: Any) -> tuple[str, ...]:
    """The family's default LoRA targets, else every projection inside the layers
    (attention and MLP; not the embeddings or the head)."""
    named = model.family.lora_targets()
    if named:
        return tuple(named)
    names = {p.module.rpartition(".")[2] for path, ps in projection_pieces(model).items()
             if ".layers." in f".{path}" for p in ps}
    return tuple(sorted(names))


def targeted(model: Any, settings: LoraSettings, module: nnx.Module) -> dict[str, list[Piece]]:
    """The pieces ``settings.targets`` names, or a clear error when it names none."""
    every = projection_pieces(model, module)
    chosen = {path: [p for p in ps if settings.targets_module(p.module)] for path, ps in every.items()}
    chosen = {path: ps for path, ps in chosen.items() if ps}
    if not chosen:
        names = sorted({p.module.rpartition(".")[2] for ps in every.values() for p in ps})
        raise AdapterError(f"no projection of this model matches the LoRA targets {settings.targets!r}; "
                           f"its modules are: {', '.join(names)}")
    return chosen


class _Remat(nnx.Module):
    """A decoder layer whose activations are recomputed in the backward pass (jax.checkpoint)."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args):
        graphdef, state = nnx.split(self.inner)
        return jax.checkpoint(lambda state, *args: nnx.merge(graphdef, state)(*args))(state, *args)


def _modules(module: nnx.Module):
    """(path, submodule) pairs: ``nnx.iter_modules`` where flax has it (0.12), else the method."""
    walk = getattr(nnx, "iter_modules", None)
    return walk(module) if walk is not None else module.iter_modules()


def _remat_layers(module: nnx.Module) -> int:
    wrapped = 0
    for _, node in list(_modules(module)):
        layers = vars(node).get("layers")
        if isinstance(layers, nnx.List):
            for i in range(len(layers)):
                layers[i] = _Remat(layers[i])
                wrapped += 1
    return wrapped


class LoraModel:
    """``model`` (an mrs.Model on JAX) with LoRA factors: ``params`` train, ``frozen`` do not."""

    def __init__(self, model: Any, settings: LoraSettings, *, seed: int = 0, remat: bool = False):
        runner = model.runner
        if getattr(runner, "backend", None) != "jax":
            raise AdapterError(f"fine-tuning runs on the JAX backend; this model is on {runner.backend}")
        if model.family.kind != "causal":
            raise AdapterError(f"{model.name} is an {model.family.kind}: LoRA fine-tuning here trains causal LMs")
        if not settings.targets:
            settings = dataclasses.replace(settings, targets=default_targets(model))
        self.model, self.settings = model, settings
        module = runner.module()
        self.pieces = targeted(model, settings, module)
        swap_linears(module, lora_variant(self.pieces, rank=settings.rank, scale=settings.scale,
                                          dropout=settings.dropout, seed=seed))
        if remat:
            _remat_layers(module)
        self.graphdef, trainable, frozen = nnx.split(module, LoraParam, ...)
        self.params, self.frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
        self._caches: dict[int, Any] = {}

    @property
    def trainable_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))

    def bind(self, params: Mapping | None = None) -> nnx.Module:
        """The module with ``params`` (default: the current ones) as its LoRA factors."""
        return nnx.merge(self.graphdef, nnx.State(params if params is not None else self.params),
                         nnx.State(self.frozen))

    def empty_cache(self, rows: int) -> Any:
        """A cache with no past positions: training attends only within each row."""
        if rows not in self._caches:
            with jax.ensure_compile_time_eval():    # concrete even when first asked for inside a jit
                self._caches[rows] = self.model.runner.new_cache(rows, 0)
        return self._caches[rows]

    def logits(self, params: Mapping, frozen: Mapping, tokens: jax.Array, positions: jax.Array,
               cache: Any) -> jax.Array:
        """Full-sequence logits [B, T, V] (pure; positions -1 mark padding)."""
        module = nnx.merge(self.graphdef, nnx.State(params), nnx.State(frozen))
        logits, _ = module(tokens, positions, cache)
        return logits

    def loss(self, params: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array], cache: Any,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(mean next-token cross-entropy over the weighted targets, their weight), in float32.

        ``batch``: tokens, positions, targets [B, T] int32 and weights [B, T] float32. With
        ``key`` LoRA dropout is on (training); without it, off (validation)."""
        with dropout_key(key):
            logits = self.logits(params, frozen, batch["tokens"], batch["positions"], cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        weight = jnp.sum(batch["weights"])
        return jnp.sum(nll * batch["weights"]) / jnp.maximum(weight, 1.0), weight

    # --- PEFT's format ----------------------------------------------------------------

    def layers(self, params: Mapping | None = None) -> list[LoraLinear]:
        """The adapted projections, bound to ``params`` (default: the current ones)."""
        return self._layers(self.bind(params))

    @staticmethod
    def _layers(module: nnx.Module) -> list[LoraLinear]:
        return [m for _, m in _modules(module) if isinstance(m, LoraLinear)]

    def adapter(self, params: Mapping | None = None) -> Adapter:
        """The factors as a PEFT adapter (checkpoint module names, B rows as the checkpoint's)."""
        weights = {}
        for layer in self.layers(params):
            for piece, a, b in zip(layer.pieces, layer.lora_a, layer.lora_b, strict=True):
                weights[piece.module] = (np.asarray(a[...], np.float32), piece.to_checkpoint(np.asarray(b[...])))
        return Adapter(self.settings, weights)

    def load_adapter(self, adapter: Adapter) -> dict:
        """Params holding ``adapter``'s factors (same rank and scale; every module it has
        must be one this model adapts), e.g. to resume from or evaluate a PEFT adapter."""
        if adapter.settings.rank != self.settings.rank or adapter.settings.scale != self.settings.scale:
            raise AdapterError(f"the adapter has rank {adapter.settings.rank} and scale {adapter.settings.scale}; "
                               f"this model was set up for {self.settings.rank} and {self.settings.scale}")
        module = self.bind()
        left = dict(adapter.weights)
        for layer in self._layers(module):
            for i, piece in enumerate(layer.pieces):
                if piece.module in left:
                    a, b = left.pop(piece.module)
                    want_a, want_b = tuple(layer.lora_a[i].shape), (piece.rows, self.settings.rank)
                    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                        raise AdapterError(f"the adapter's {piece.module} has A {tuple(a.shape)} and B "
                                           f"{tuple(b.shape)}; this model needs A {want_a} and B {want_b} — "
                                           "is it for another base model?")
                    layer.lora_a[i].set_value(jnp.asarray(a, jnp.float32))
                    layer.lora_b[i].set_value(jnp.asarray(piece.to_model(np.asarray(b, np.float32))))
        if left:
            raise AdapterError(f"the adapter changes modules this set-up does not adapt: {', '.join(sorted(left)[:3])}")
        _, trainable, _ = nnx.split(module, LoraParam, ...)
        return nnx.to_pure_dict(trainable)
