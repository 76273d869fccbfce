"""Jitted steps over (params, cache): forward for research, prefill and decode for
generation, with sampling fused in so a step returns tokens, not logits.

Shapes are the only static inputs: batch (slots), prompt bucket, cache length and
the history window. Sampling values are arrays, so new values never recompile. The
cache is donated, so XLA updates it in place. Each step's executables persist across
processes (executables.StoredStep), so a later run neither traces nor compiles.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs.backends import Sampled
from mrs.backends.jax.executables import StoredStep
from mrs.backends.jax.layout import Layout
from mrs.backends.jax.sampling import SampleResult, SamplingParams, sample
from mrs.cache import put_slots, take_slots
from mrs.shard import Plan


def bind(graphdef: Any, params: dict) -> nnx.Module:
    """The Flax module for a graphdef and a pure param dict (inside or outside jit)."""
    return nnx.merge(graphdef, nnx.State(params))


def push_history(history: jax.Array, tokens: jax.Array) -> jax.Array:
    """Append tokens [B] to the right-aligned history window [B, W]."""
    return jnp.concatenate([history[:, 1:], tokens[:, None].astype(history.dtype)], axis=1)


def compiler_options(device: jax.Device) -> dict[str, Any]:
    """XLA options for the steps on this device.

    On CPU, XLA's default copy insertion copies a donated cache layer that a step
    both reads (attention) and updates in place (the new position): up to four
    full-cache copies per layer per step. Region analysis proves the in-place update
    safe and drops those copies.
    """
    if device.platform == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}


class CompiledSteps:
    """The jitted functions of one model graph (shared by every model of that graph and
    config, e.g. copies), taking the params as their first argument."""

    def __init__(self, graphdef: Any, device: jax.Device, vocab_size: int, num_top: int = 0,
                 identity: str | None = None, layout: Layout | None = None):
        """``identity`` names what the graph computes across processes (model class, config,
        dtype, formats); None keeps its executables in this process only. ``layout`` says
        where arrays live (one device, or a tensor-parallel mesh): each step returns its
        cache in the cache's own shardings and its tokens on every device."""
        self.num_top = num_top
        self.device, self.vocab_size = device, vocab_size
        self.layout = layout = layout or Layout(Plan(1), device)
        self._everything: dict[int, jax.Array] = {}

        def forward(params, tokens, positions, cache):
            """All-position logits [B, T, V] (float32) and the updated cache."""
            logits, cache = bind(graphdef, params)(tokens, positions, cache)
            return layout.replicate(logits.astype(jnp.float32)), layout.constrain_cache(cache)

        def prefill(params, tokens, positions, cache, sampling: SamplingParams, history, step, allowed):
            """Run prompts [B, T] (positions -1 = padding) and sample each row's first token
            among the ``allowed`` [B, V] ones (see ``all_allowed``; constrained decoding)."""
            logits, cache = bind(graphdef, params)(tokens, positions, cache, last_only=True)
            result = sample(layout.replicate(logits[:, 0]), sampling, history, step, num_top=num_top, allowed=allowed)
            return layout.replicate(result), layout.constrain_cache(cache)

        def prefill_slot(params, tokens, positions, cache, slot, sampling: SamplingParams, history, step, allowed):
            """Prefill one request [1, T] into cache slot ``slot``, continuing the slot's state
            from the first position (0 starts afresh, k > 0 reuses the k positions held).

            Nothing is cleared: attention sees only positions below the first new one (and
            the new block), and a Mamba row that starts at 0 starts from zero state, so what
            a slot held past the first position is never read."""
            start = jnp.min(jnp.where(positions < 0, jnp.iinfo(jnp.int32).max, positions), axis=1)
            row = dataclasses.replace(take_slots(cache, slot[None]), lengths=start.astype(jnp.int32))
            result, row = prefill(params, tokens, positions, row, sampling, history, step, allowed)
            return result, layout.constrain_cache(put_slots(cache, slot[None], row))

        def decode(params, tokens, cache, sampling: SamplingParams, history, step, active, allowed):
            """Feed each active row's last token [B] at its own position; sample the next
            among the ``allowed`` [B, V] tokens.

            Inactive rows (free slots, finished requests) write nothing and keep their length.
            """
            positions = jnp.where(active, cache.lengths, -1)[:, None]
            logits, cache = bind(graphdef, params)(tokens[:, None], positions, cache)
            history = push_history(history, tokens)
            result: SampleResult = sample(layout.replicate(logits[:, 0]), sampling, history, step, num_top=num_top,
                                          allowed=allowed)
            return layout.replicate(result), layout.constrain_cache(cache), layout.replicate(history)

        options = compiler_options(device)
        step_options = f"num_top={num_top}\n{sorted(options.items())}"

        def step(name: str, fn: Any, donate: tuple[int, ...], describe: Any) -> StoredStep:
            jitted = jax.jit(fn, donate_argnums=donate, compiler_options=options)
            return StoredStep(name, jitted, device, identity, describe, step_options, layout.device_list)

        self.forward = step("forward", forward, (3,), lambda a: f"the forward pass over {_rows(a[1])}")
        self.prefill = step("prefill", prefill, (3,), lambda a: f"prefill of {_rows(a[1])}")
        self.prefill_slot = step("prefill_slot", prefill_slot, (3,), lambda a: f"prefill of {_rows(a[1])}")
        self.decode = step("decode", decode, (2, 4), lambda a: f"decode of {_count(a[1].shape[0], 'row')}")

    def all_allowed(self, batch: int) -> jax.Array:
        """A [batch, vocab] all-true mask, for steps where no row is constrained."""
        if batch not in self._everything:
            # From the host: an eager jnp.ones would compile a broadcast in every fresh process.
            self._everything[batch] = jax.device_put(np.ones((batch, self.vocab_size), bool), self.layout.replicated)
        return self._everything[batch]

    def compiled_count(self) -> int:
        """How many distinct compilations these steps hold (for no-recompile tests)."""
        return sum(f._cache_size() for f in (self.forward, self.prefill, self.prefill_slot, self.decode))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _rows(tokens: Any) -> str:
    batch, width = tokens.shape
    return f"{_count(batch, 'prompt')} of {width} tokens"


@jax.jit
def _put_row(array: jax.Array, index: jax.Array, row: jax.Array) -> jax.Array:
    """array[index] = row[0] (index traced, so no slot ever recompiles).

    Not donated: the next tokens array is also the in-flight step's result, read later.
    """
    return array.at[index].set(row[0])


class JaxPending:
    """A dispatched step's SampleResult; ``read`` waits for it (once) and brings it to numpy."""

    def __init__(self, result: SampleResult):
        self.result = result
        self.tokens = result.tokens
        self._read: Sampled | None = None

    def read(self, top: bool = False) -> Sampled:
        r = self.result
        if self._read is None:      # tokens and log-probs once; the alternatives only when asked
            empty = np.zeros((r.tokens.shape[0], 0))
            self._read = Sampled(Layout.host(r.tokens), Layout.host(r.logprobs), empty.astype(np.int32),
                                 empty.astype(np.float32))
        if top and self._read.top_ids.shape[1] != r.top_ids.shape[1]:
            self._read = self._read._replace(top_ids=Layout.host(r.top_ids), top_logprobs=Layout.host(r.top_logprobs))
        return self._read


# Weak: a model's compiled code (each CPU executable in its own memory maps) goes when the
# last model using it goes, so a server that loads and unloads models does not keep it all
# (a process past the kernel's max_map_count, 65530 maps, aborts in the compiler).
_SHARED: weakref.WeakValueDictionary[Any, CompiledSteps] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_steps(graphdef: Any, config: Any, dtype: Any, device: jax.Device, vocab_size: int,
                 num_top: int, identity: str | None = None, layout: Layout | None = None) -> CompiledSteps:
    """Compiled steps shared by models of the same graph, config and dtype (e.g. copies)."""
    mesh = layout.mesh if layout is not None else None
    try:
        key = (graphdef, config, str(dtype), device, num_top, identity, mesh)
        hash(key)
    except TypeError:
        return CompiledSteps(graphdef, device, vocab_size, num_top, identity, layout)
    with _SHARED_LOCK:
        steps = _SHARED.get(key)
        if steps is None:
            steps = _SHARED[key] = CompiledSteps(graphdef, device, vocab_size, num_top, identity, layout)
        return steps


class JaxSteps:
    """The backend protocol's Steps (mrs/backends) over one model's params and CompiledSteps."""

    def __init__(self, compiled: CompiledSteps, params: Any):
        self.compiled, self.params = compiled, params
        self.vocab_size = compiled.vocab_size

    def _device(self, x: Any) -> jax.Array:
        return self.compiled.layout.put(x)

    def sampling(self, params: SamplingParams) -> SamplingParams:
        return jax.tree.map(self._device, params)

    def history(self, history: np.ndarray) -> jax.Array:
        return self._device(np.asarray(history, np.int32))

    def tokens(self, tokens: np.ndarray) -> jax.Array:
        return self._device(np.asarray(tokens, np.int32))

    def _allowed(self, allowed: np.ndarray | None, batch: int) -> jax.Array:
        return self.compiled.all_allowed(batch) if allowed is None else self._device(allowed)

    def prefill(self, cache, tokens, positions, sampling, history, step, allowed):
        result, cache = self.compiled.prefill(self.params, tokens, positions, cache, sampling, history, step,
                                              self._allowed(allowed, np.shape(tokens)[0]))
        return JaxPending(result), cache

    def _prefill_slot_spec(self, width: int, cache: Any) -> tuple:
        row = SamplingParams.make(temperature=0, seed=0)
        max_len = int(cache.max_len)
        layout = self.compiled.layout
        # Each argument where it will be: the params and cache in their shardings, the rest on every device.
        where = (lambda x: x.sharding if isinstance(x, jax.Array) else layout.replicated) if layout.sharded \
            else (lambda x: None)
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=where(x)), (
            self.params, np.zeros((1, width), np.int32), np.zeros((1, width), np.int32), cache, np.int32(0), row,
            np.zeros((1, max_len), np.int32), np.zeros((1,), np.int32), self.compiled.all_allowed(1)))

    def prefill_slot(self, width: int, cache: Any):
        return self._prefill_slot_run(self.compiled.prefill_slot.compile(*self._prefill_slot_spec(width, cache)))

    def stored_prefill_slot(self, width: int, cache: Any):
        """``prefill_slot`` if its executable is at hand (this process or the compile cache),
        else None: what a server preloads at start without compiling anything."""
        executable = self.compiled.prefill_slot.stored(*self._prefill_slot_spec(width, cache))
        return None if executable is None else self._prefill_slot_run(executable)

    def _prefill_slot_run(self, executable: Any):
        """The protocol's prefill_slot callable over one compiled executable."""
        params = self.params

        def run(cache, tokens, positions, slot, sampling, history, step, allowed):
            result, cache = executable(params, tokens, positions, cache, np.int32(slot), sampling, history, step,
                                       self._allowed(allowed, 1))
            return JaxPending(result), cache

        return run

    def decode(self, cache, tokens, sampling, history, step, active, allowed):
        result, cache, history = self.compiled.decode(self.params, tokens, cache, sampling, history, step, active,
                                                      self._allowed(allowed, np.shape(active)[0]))
        return JaxPending(result), cache, history

    def put_row(self, array: jax.Array, slot: int, row: Any) -> jax.Array:
        return _put_row(array, np.int32(slot), row)

    def compiled_count(self) -> int:
        """Executables these steps hold (prefill_slot's ahead-of-time ones included)."""
        return self.compiled.compiled_count() + _put_row._cache_size()
