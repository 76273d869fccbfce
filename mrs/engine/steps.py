"""Jitted steps over (params, cache): forward for research, prefill and decode for
generation, with sampling fused in so a step returns tokens, not logits.

Shapes are the only static inputs: batch (slots), prompt bucket, cache length and
the history window. Sampling values are arrays, so new values never recompile. The
cache is donated, so XLA updates it in place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mrs.cache import put_slots, take_slots
from mrs.model import bind
from mrs.sampling import SampleResult, SamplingParams, sample

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 256


def bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power-of-two multiple of ``minimum`` holding n, capped at ``cap``."""
    size = minimum
    while size < n:
        size *= 2
    return max(min(size, cap), min(n, cap))


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


class Steps:
    """The compiled functions of one model (shared by every caller of that model)."""

    def __init__(self, model: Any, num_top: int = 0):
        graphdef = model.graphdef
        self.num_top = num_top
        self.device, self.vocab_size = model.device, model.vocab_size
        self._everything: dict[int, jax.Array] = {}

        def forward(params, tokens, positions, cache):
            """All-position logits [B, T, V] (float32) and the updated cache."""
            logits, cache = bind(graphdef, params)(tokens, positions, cache)
            return logits.astype(jnp.float32), cache

        def prefill(params, tokens, positions, cache, sampling: SamplingParams, history, step, allowed):
            """Run prompts [B, T] (positions -1 = padding) and sample each row's first token
            among the ``allowed`` [B, V] ones (see ``all_allowed``; constrained decoding)."""
            logits, cache = bind(graphdef, params)(tokens, positions, cache, last_only=True)
            return sample(logits[:, 0], sampling, history, step, num_top=num_top, allowed=allowed), cache

        def prefill_slot(params, tokens, positions, cache, slot, sampling: SamplingParams, history, step, allowed):
            """Prefill one new request [1, T] into cache slot ``slot`` (its old state cleared)."""
            fresh = jax.tree_util.tree_map(jnp.zeros_like, take_slots(cache, slot[None]))
            result, fresh = prefill(params, tokens, positions, fresh, sampling, history, step, allowed)
            return result, put_slots(cache, slot[None], fresh)

        def decode(params, tokens, cache, sampling: SamplingParams, history, step, active, allowed):
            """Feed each active row's last token [B] at its own position; sample the next
            among the ``allowed`` [B, V] tokens.

            Inactive rows (free slots, finished requests) write nothing and keep their length.
            """
            positions = jnp.where(active, cache.lengths, -1)[:, None]
            logits, cache = bind(graphdef, params)(tokens[:, None], positions, cache)
            history = push_history(history, tokens)
            result: SampleResult = sample(logits[:, 0], sampling, history, step, num_top=num_top, allowed=allowed)
            return result, cache, history

        options = compiler_options(model.device)
        self.forward = jax.jit(forward, donate_argnums=(3,), compiler_options=options)
        self.prefill = jax.jit(prefill, donate_argnums=(3,), compiler_options=options)
        self.prefill_slot = jax.jit(prefill_slot, donate_argnums=(3,), compiler_options=options)
        self.decode = jax.jit(decode, donate_argnums=(2, 4), compiler_options=options)

    def all_allowed(self, batch: int) -> jax.Array:
        """A [batch, vocab] all-true mask, for steps where no row is constrained."""
        if batch not in self._everything:
            with jax.default_device(self.device):
                self._everything[batch] = jnp.ones((batch, self.vocab_size), bool)
        return self._everything[batch]

    def compiled_count(self) -> int:
        """How many distinct compilations these steps hold (for no-recompile tests)."""
        return sum(f._cache_size() for f in (self.forward, self.prefill, self.prefill_slot, self.decode))
