"""The JAX sampling kernel: per-row `SamplingParams` -> next tokens, one jitted function
for a whole batch; `sample_jit` compiles once per (batch, vocab, history window,
num_top) shape. The semantics and their order are mrs/sampling.py's docstring.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mrs.errors import InvalidParameterError
from mrs.sampling import CANDIDATES, FILTERED_LOGPROB, MAX_NUM_TOP, SamplingParams, seed_key_data  # noqa: F401

_MIN_TEMPERATURE = 1e-6  # below this a positive temperature acts as this (greedy-like)
_PRNG_IMPL = "threefry2x32"

# The backend-free parameters travel into jit as a pytree of their per-row arrays.
jax.tree_util.register_dataclass(SamplingParams, data_fields=[f.name for f in dataclasses.fields(SamplingParams)],
                                 meta_fields=[])


class SampleResult(NamedTuple):
    """Next tokens, their log-probs, and the `num_top` most likely alternatives."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, of the chosen token under the processed logits
    top_ids: jax.Array  # [B, N] int32, most likely first
    top_logprobs: jax.Array  # [B, N] float32, FILTERED_LOGPROB outside the support


class Filtered(NamedTuple):
    """The processed logits of a batch and the candidates they were filtered among."""

    logits: jax.Array      # [B, V] float32, -inf outside the support
    top_ids: jax.Array     # [B, C] ids of the C largest logits before filtering
    within: jax.Array      # [B] bool: the row's whole support is among its top_ids


def process_logits(logits: jax.Array, params: SamplingParams, history: jax.Array,
                   logit_bias: jax.Array | None = None, allowed: jax.Array | None = None) -> jax.Array:
    """[B, V] logits -> the [B, V] float32 logits sampled from (-inf outside the support)."""
    return _process(logits, params, history, logit_bias, allowed).logits


def _process(logits: jax.Array, params: SamplingParams, history: jax.Array,
             logit_bias: jax.Array | None, allowed: jax.Array | None) -> Filtered:
    x = logits.astype(jnp.float32)
    if allowed is not None:
        x = jnp.where(allowed, x, -jnp.inf)
    if logit_bias is not None:
        x = x + logit_bias.astype(jnp.float32)
    penalized = (params.repeat_penalty != 1) | (params.presence_penalty != 0) | (params.frequency_penalty != 0)
    x = jax.lax.cond(jnp.any(penalized), lambda x: _penalize(x, params, history), lambda x: x, x)
    t = jnp.where(params.temperature == 0, 1.0, jnp.maximum(params.temperature,
                                                             _MIN_TEMPERATURE))
    return _filter(x / t[:, None], params)


def first_argmax(z: jax.Array) -> jax.Array:
    """``jnp.argmax(z, -1)`` (the first of tied maxima) as a max, then the least index that
    holds it: two plain reductions, which XLA's CPU backend vectorizes; its argmax's
    (value, index) reduction is 5x slower over a 262K vocabulary (1.3 ms a step)."""
    V = z.shape[-1]
    top = jnp.max(z, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(z == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(index, V - 1)          # a NaN row (no index equals its max): the last, not V


def sample(logits: jax.Array, params: SamplingParams, history: jax.Array, step: jax.Array,
           *, num_top: int = 0, logit_bias: jax.Array | None = None,
           allowed: jax.Array | None = None) -> SampleResult:
    """Pick each row's next token; see the module docstring for the order of operations.

    logits [B, V] any float dtype; history [B, W] int32 recent tokens, right-aligned (most
    recent last), -1 where empty; step [B] int32 tokens generated so far by each request
    (the draw uses ``fold_in(key_row, step_row)``, so a request's stream does not depend
    on its batch); logit_bias optional [B, V]; allowed optional [B, V] bool, the only
    tokens a row may take (constrained decoding; each row needs at least one);
    num_top (static, 0..20) alternatives.
    """
    if not 0 <= num_top <= MAX_NUM_TOP:
        raise InvalidParameterError("num_top", num_top, f"an integer in [0, {MAX_NUM_TOP}]")
    z, candidates, within = _process(logits, params, history, logit_bias, allowed)  # [B, V], [B, C], [B]
    candidates = candidates.astype(jnp.int32)
    greedy = first_argmax(z)

    def draw(z):
        keys = jax.vmap(_draw_key)(params.key, jnp.asarray(step, jnp.int32))
        # A row whose support lies among its candidates draws among those C logits, not
        # V: the same distribution for a C-th of the random numbers. Which of the two a
        # row takes depends on that row alone, so its stream does not depend on its batch.
        pick = jax.vmap(jax.random.categorical)(keys, jnp.take_along_axis(z, candidates, axis=-1))
        among_candidates = jnp.take_along_axis(candidates, pick[:, None], axis=-1)[:, 0]
        sampling = params.temperature > 0
        whole_vocab = jax.lax.cond(jnp.any(sampling & ~within),
                                   lambda z: jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32),
                                   lambda z: among_candidates, z)
        return jnp.where(sampling, jnp.where(within, among_candidates, whole_vocab), greedy)

    # A draw costs random numbers per row; skip it when no row samples.
    tokens = jax.lax.cond(jnp.all(params.temperature == 0), lambda z: greedy, draw, z)
    normalizer = jax.nn.logsumexp(z, axis=-1)                                # [B]
    chosen = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - normalizer
    if num_top:
        top_z, top_ids = jax.lax.top_k(z, num_top)
        top_lp = top_z - normalizer[:, None]
    else:
        top_lp = jnp.zeros((z.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((z.shape[0], 0), jnp.int32)
    top_lp = jnp.where(jnp.isfinite(top_lp), top_lp, FILTERED_LOGPROB)
    return SampleResult(tokens, chosen, top_ids.astype(jnp.int32), top_lp)


sample_jit = jax.jit(sample, static_argnames=("num_top",))


def _penalize(x: jax.Array, params: SamplingParams, history: jax.Array) -> jax.Array:
    """Repetition (HF), then presence and frequency (OpenAI) penalties over the window."""
    (B, V), W = x.shape, history.shape[1]
    n = jnp.where(params.repeat_last_n < 0, W, params.repeat_last_n)  # [B]
    history = history.astype(jnp.int32)
    in_window = (jnp.arange(W)[None, :] >= W - n[:, None]) & (history >= 0)  # [B, W]
    ids = jnp.where(in_window, history, V)  # V (and ids >= V) fall off the scatter
    counts = jnp.zeros((B, V), jnp.float32).at[jnp.arange(B)[:, None], ids].add(
        1.0, mode="drop")  # [B, V]
    seen = counts > 0
    p = params.repeat_penalty[:, None]
    x = jnp.where(seen, jnp.where(x < 0, x * p, x / p), x)
    return (x - params.frequency_penalty[:, None] * counts
            - params.presence_penalty[:, None] * seen)


def _filter(x: jax.Array, params: SamplingParams) -> Filtered:
    """HF's TopK, TopP, MinP warpers (min_tokens_to_keep=1).

    Top-k and top-p need the largest logits in order. The C = ``CANDIDATES`` largest
    (``lax.top_k``, ~100x cheaper than sorting the vocabulary) decide a row when its
    top-k keeps at most C tokens (Ollama's default top_k is 40), or when top-k is off
    and its nucleus closes above the smallest candidate (the usual case for a trained
    model with top_p < 1; OpenAI clients send top_p without top_k). Any other row that
    filters (a top-k above C, a nucleus wider than the candidates, a top-k + top-p cut
    tied beyond the candidates) is filtered over its sorted vocabulary. Both orders
    give the same result; a row keeps its own order whatever its batch.
    """
    B, V = x.shape
    C = min(CANDIDATES, V)
    top, top_ids = jax.lax.top_k(x, C)                                        # [B, C] descending
    asc = top[:, ::-1]
    top_k_on = (params.top_k > 0) & (params.top_k < V)
    open_nucleus = ~top_k_on & (params.top_p < 1)   # a nucleus over the whole vocabulary

    def outside_mass(x):
        """Probability outside the candidates, for the rows with an open nucleus."""
        mass = jnp.exp(jax.nn.logsumexp(asc, axis=-1) - jax.nn.logsumexp(x, axis=-1))
        return jnp.where(open_nucleus, jnp.maximum(1 - mass, 0.0), 0.0)

    tail = jax.lax.cond(jnp.any(open_nucleus) & (C < V), outside_mass, lambda x: jnp.zeros((B,), x.dtype), x)
    fast = _filter_with(x, params, asc, tail)
    if C == V:                       # the candidates are the whole vocabulary
        return Filtered(fast.logits, top_ids, jnp.ones((B,), bool))
    # A top-k cut tied beyond the candidates (bf16 logits tie often) keeps those ties,
    # and a nucleus after it must count their mass: sort then.
    decided_by_top_k = top_k_on & (params.top_k <= C) & ((params.top_p >= 1) | ~fast.tied_past)
    decided_by_nucleus = open_nucleus & (fast.smallest_cum <= 1 - params.top_p)
    needs_sort = (top_k_on & ~decided_by_top_k) | (open_nucleus & ~decided_by_nucleus)
    # Rows the candidates decided keep that result when another row sorts: a row's
    # filter must not depend on its batch, and the two orders can round apart at a cut.
    z = jax.lax.cond(jnp.any(needs_sort),
                     lambda x: jnp.where(needs_sort[:, None], _filter_with(
                         x, params, jnp.sort(x, axis=-1), jnp.zeros((B,), x.dtype)).logits, fast.logits),
                     lambda x: fast.logits, x)
    # Ties at a cut are all kept, so a support can reach past the candidates even when
    # they decided the cut: count rather than infer.
    within = jnp.sum(jnp.isfinite(z), axis=-1) == jnp.sum(jnp.isfinite(jnp.take_along_axis(z, top_ids, axis=-1)),
                                                          axis=-1)
    return Filtered(z, top_ids, within)


class _Cut(NamedTuple):
    logits: jax.Array        # [B, V] filtered
    smallest_cum: jax.Array  # [B] the nucleus' cumulative mass at the smallest candidate
    tied_past: jax.Array     # [B] the top-k cut keeps more than the C candidates (ties)


def _filter_with(x: jax.Array, params: SamplingParams, asc: jax.Array, tail: jax.Array) -> _Cut:
    """Filter x [B, V] given ``asc`` [B, C]: its C largest logits, ascending (C <= V), and
    ``tail`` [B]: the probability mass outside them (0 when top-k keeps at most C tokens).

    The smallest candidate and everything below it are dropped when ``smallest_cum`` is
    <= 1 - top_p.
    """
    ninf = jnp.float32(-jnp.inf)
    C = asc.shape[-1]
    top_k_on = (params.top_k > 0) & (params.top_k < x.shape[-1])
    k = jnp.minimum(params.top_k, C)
    kth = jnp.take_along_axis(asc, jnp.maximum(C - k, 0)[:, None], axis=-1)  # k-th largest, [B, 1]
    kth = jnp.where(top_k_on[:, None], kth, ninf)
    # (Comparing x with a value gathered at a fixed index of lax.top_k's output makes
    # XLA turn the top-k into a full sort; kth's index depends on top_k, so it does not.)
    tied_past = jnp.sum(x >= kth, axis=-1) > C
    x, asc = jnp.where(x >= kth, x, ninf), jnp.where(asc >= kth, asc, ninf)
    # Top-p: drop the low tail whose cumulative mass is <= 1 - top_p; keep the top token.
    # Ascending, the cumulative mass starts with everything outside the candidates.
    cum = tail[:, None] + jnp.cumsum(jax.nn.softmax(asc, axis=-1) * (1 - tail)[:, None], axis=-1)
    drop = (cum <= (1 - params.top_p)[:, None]) & (jnp.arange(C) < C - 1)
    cut = jnp.take_along_axis(asc, jnp.argmin(drop, axis=-1)[:, None], axis=-1)
    x = jnp.where((x >= cut) | (params.top_p >= 1)[:, None], x, ninf)
    # Min-p: p >= min_p * p_max, i.e. x - x_max >= log(min_p), with no softmax over V.
    keep = x - jnp.max(x, axis=-1, keepdims=True) >= jnp.log(params.min_p)[:, None]
    return _Cut(jnp.where(keep, x, ninf), cum[:, 0], tied_past)


def _draw_key(key_data: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=_PRNG_IMPL), step)


