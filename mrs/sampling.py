"""Next-token sampling for every generation path, one jitted function for a whole batch.

Each row of a batch is a different request with its own temperature, top-k, seed and
penalties. They travel as per-row arrays in a `SamplingParams` pytree, never as static
arguments, so a new value never recompiles: `sample_jit` compiles once per
(batch, vocab, history window, num_top) shape.

Processing order for each row (that of transformers' `generate`, with OpenAI's
presence/frequency penalties after the repetition penalty):

0. tokens outside a row's ``allowed`` mask (constrained decoding) become -inf;
1. logit bias is added (as HF's SequenceBias, which runs before its penalties);
2. repetition penalty, HF `RepetitionPenaltyLogitsProcessor`: a logit of a token seen in
   the window becomes ``l * p`` if ``l < 0`` else ``l / p``;
3. presence/frequency penalty, OpenAI: ``l -= frequency * count + presence * (count > 0)``
   with counts over the same window (the last `repeat_last_n` tokens of `history`);
4. temperature (greedy rows use 1), then top-k, top-p, min-p as HF's warpers
   (ties at a cut are all kept; at least the most likely token always survives);
5. greedy rows (temperature 0) take the argmax, the others draw from
   ``softmax(processed)`` with the key ``fold_in(key_row, step_row)`` (among the
   ``CANDIDATES`` largest logits when the row's support lies there, which needs a
   fraction of the random numbers of a draw over the vocabulary).

Returned log-probabilities are ``log_softmax`` of the processed logits of step 4, the
distribution actually sampled from (for greedy rows: at temperature 1, filtered).
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mrs.errors import InvalidParameterError

# Ollama's defaults, except repeat_penalty: Ollama uses 1.1, mrs 1.0 (off), as
# transformers and OpenAI do, so that a default request is not silently penalised.
DEFAULTS = MappingProxyType({
    "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0,
    "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0,
})
# Log-prob reported for alternatives outside the filtered support: JSON has no -inf.
FILTERED_LOGPROB = -1e30
MAX_NUM_TOP = 20
# Rows with top_k <= CANDIDATES are filtered without sorting the vocabulary.
CANDIDATES = 64
_MIN_TEMPERATURE = 1e-6  # below this a positive temperature acts as this (greedy-like)
_INT32_MAX = 2**31 - 1
_PRNG_IMPL = "threefry2x32"


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of a batch, one entry per row (request)."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off; >= vocab = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    repeat_penalty: jax.Array  # [B] float32, 1 = off
    repeat_last_n: jax.Array  # [B] int32 window of history seen; -1 = all, 0 = none
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    key: jax.Array  # [B, 2] uint32 raw threefry key data, from the request's seed

    @classmethod
    def make(cls, *, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None,
             repeat_penalty: float | None = None, repeat_last_n: int | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             seed: int | None = None) -> SamplingParams:
        """Validate one request's parameters (None = `DEFAULTS`) into a batch of one row.

        `seed` None draws a fresh random seed; any other int is taken modulo 2**64 and
        gives the key ``jax.random.PRNGKey(seed)`` would give with 64-bit seeds enabled.
        """
        given = (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                 presence_penalty, frequency_penalty)
        v = {name: DEFAULTS[name] if value is None else value
             for name, value in zip(DEFAULTS, given, strict=True)}
        f32, i32 = np.float32, np.int32
        return cls(
            temperature=_row(_real("temperature", v["temperature"], lambda x: x >= 0,
                                   "a finite number >= 0 (0 = greedy)"), f32),
            top_k=_row(_int("top_k", v["top_k"], 0, "an integer >= 0 (0 = off)"), i32),
            top_p=_row(_real("top_p", v["top_p"], lambda x: 0 < x <= 1,
                             "a number in (0, 1] (1 = off)"), f32),
            min_p=_row(_real("min_p", v["min_p"], lambda x: 0 <= x <= 1,
                             "a number in [0, 1] (0 = off)"), f32),
            repeat_penalty=_row(_real("repeat_penalty", v["repeat_penalty"], lambda x: x > 0,
                                      "a finite number > 0 (1 = off)"), f32),
            repeat_last_n=_row(_int("repeat_last_n", v["repeat_last_n"], -1,
                                    "an integer >= -1 (-1 = whole history, 0 = none)"), i32),
            presence_penalty=_row(_real("presence_penalty", v["presence_penalty"],
                                        lambda x: -2 <= x <= 2, "a number in [-2, 2]"), f32),
            frequency_penalty=_row(_real("frequency_penalty", v["frequency_penalty"],
                                         lambda x: -2 <= x <= 2, "a number in [-2, 2]"), f32),
            key=jnp.asarray(seed_key_data(seed)[None]),
        )

    @classmethod
    def stack(cls, rows: Sequence[SamplingParams]) -> SamplingParams:
        """Concatenate rows (each a batch of any size) into one batch, on the host."""
        if not rows:
            raise ValueError("SamplingParams.stack needs at least one row")
        return jax.tree.map(lambda *a: jnp.asarray(np.concatenate([np.asarray(x) for x in a])),
                            *rows)

    def replace_row(self, i: int, row: SamplingParams) -> SamplingParams:
        """A copy with row `i` set to the one-row `row` (for a continuous batcher's slots)."""
        if row.batch_size != 1 or not 0 <= i < self.batch_size:
            raise ValueError(f"replace_row needs a one-row SamplingParams and 0 <= i < "
                             f"{self.batch_size}, got {row.batch_size} rows and i={i}")
        return _set_row(self, i, row)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.temperature.shape[0]


@jax.jit
def _set_row(params: SamplingParams, i: jax.Array, row: SamplingParams) -> SamplingParams:
    # `i` is traced, so a continuous batcher's slot changes never recompile.
    return jax.tree.map(lambda a, r: a.at[i].set(r[0]), params, row)


class SampleResult(NamedTuple):
    """Next tokens, their log-probs, and the `num_top` most likely alternatives."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, of the chosen token under the processed logits
    top_ids: jax.Array  # [B, N] int32, most likely first
    top_logprobs: jax.Array  # [B, N] float32, FILTERED_LOGPROB outside the support


def seed_key_data(seed: int | None) -> np.ndarray:
    """Raw threefry key data [2] uint32 for a seed (None: a fresh random one)."""
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise InvalidParameterError("seed", seed, "an integer (or None for a random seed)")
    s = int(seed) % 2**64  # threefry seeds a 64-bit value as [high 32 bits, low 32 bits]
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


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
    greedy = jnp.argmax(z, axis=-1).astype(jnp.int32)

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


def _row(value: float, dtype: type) -> jax.Array:
    return jnp.asarray(np.array([value], dtype=dtype))


def _real(name: str, value: object, ok: Callable[[float], bool], valid: str) -> float:
    """A finite real number (no bool, no NaN) for which `ok` holds, else the typed error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(name, value, valid)
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidParameterError(name, value, valid) from None
    if not (math.isfinite(x) and ok(x)):
        raise InvalidParameterError(name, value, valid)
    return x


def _int(name: str, value: object, lowest: int, valid: str) -> int:
    """An integer >= `lowest` (an integral float such as JSON's 40.0 counts), capped to int32."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        x = int(value)
    else:
        x = int(_real(name, value, float.is_integer, valid))
    if x < lowest:
        raise InvalidParameterError(name, value, valid)
    return min(x, _INT32_MAX)  # top_k / repeat_last_n beyond int32 mean "everything"
