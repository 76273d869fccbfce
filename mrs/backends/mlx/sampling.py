"""The MLX sampling kernel: per-row `SamplingParams` -> next tokens for a whole batch, as
one lazy MLX graph (nothing is traced or compiled). The semantics and their order are
mrs/sampling.py's docstring; the JAX kernel (mrs/backends/jax/sampling.py) is the
reference, and this module follows it step for step.

MLX evaluates lazily and the engine reads a step's result one step late, so this module
never looks at a value computed from the logits: it branches on the host only on the
numpy `SamplingParams` (skip the penalties when no row penalizes, the draw when every row
is greedy, the sort when no row needs it). Where the JAX kernel uses ``lax.cond`` on a
logit-dependent predicate, this one decides per row from its parameters alone and
selects with ``mx.where``, so a row's result never depends on its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mrs.errors import InvalidParameterError
from mrs.sampling import CANDIDATES, FILTERED_LOGPROB, MAX_NUM_TOP, SamplingParams

_MIN_TEMPERATURE = 1e-6  # below this a positive temperature acts as this (greedy-like)


class SampleResult(NamedTuple):
    """Next tokens, their log-probs, and the `num_top` most likely alternatives."""

    tokens: mx.array  # [B] int32
    logprobs: mx.array  # [B] float32, of the chosen token under the processed logits
    top_ids: mx.array  # [B, N] int32, most likely first
    top_logprobs: mx.array  # [B, N] float32, FILTERED_LOGPROB outside the support


def _mx(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


def process_logits(logits: mx.array, params: SamplingParams, history: mx.array,
                   logit_bias: mx.array | None = None, allowed: mx.array | None = None) -> mx.array:
    """[B, V] logits -> the [B, V] float32 logits sampled from (-inf outside the support)."""
    x = _mx(logits, mx.float32)
    if allowed is not None:
        x = mx.where(_mx(allowed, mx.bool_), x, -mx.inf)
    if logit_bias is not None:
        x = x + _mx(logit_bias, mx.float32)
    penalized = ((params.repeat_penalty != 1) | (params.presence_penalty != 0)
                 | (params.frequency_penalty != 0))
    if penalized.any():  # host-side, on the parameters: an unpenalized row is unchanged anyway
        x = _penalize(x, params, _mx(history, mx.int32))
    temperature = np.asarray(params.temperature, np.float32)
    t = np.where(temperature == 0, np.float32(1), np.maximum(temperature, np.float32(_MIN_TEMPERATURE)))
    return _filter(x / mx.array(t.astype(np.float32))[:, None], params)


def first_argmax(z: mx.array) -> mx.array:
    """``np.argmax(z, -1)`` as int32: MLX's argmax already returns the first of tied
    maxima (checked on the CPU over 262K-wide rows, ties far apart; a row of -inf gives 0,
    a NaN counts as the maximum, as in numpy); it returns uint32, hence the cast."""
    return mx.argmax(z, axis=-1).astype(mx.int32)


def sample(logits: mx.array, params: SamplingParams, history: mx.array, step: np.ndarray,
           *, num_top: int = 0, logit_bias: mx.array | None = None,
           allowed: mx.array | None = None) -> SampleResult:
    """Pick each row's next token; see mrs/sampling.py for the order of operations.

    logits [B, V] any float dtype; params numpy rows; history [B, W] int32 recent tokens,
    right-aligned (most recent last), -1 where empty; step [B] int32 (numpy: it seeds the
    draw on the host) tokens generated so far by each request; logit_bias optional
    [B, V]; allowed optional [B, V] bool, the only tokens a row may take (each row needs
    at least one); num_top (0..20) alternatives.
    """
    if not 0 <= num_top <= MAX_NUM_TOP:
        raise InvalidParameterError("num_top", num_top, f"an integer in [0, {MAX_NUM_TOP}]")
    z = process_logits(logits, params, history, logit_bias, allowed)  # [B, V]
    B, V = z.shape
    tokens = first_argmax(z)
    sampling = np.asarray(params.temperature) > 0
    if sampling.any():  # a draw costs V random numbers per row; skip it when no row samples
        drawn = first_argmax(z - mx.log(_exponentials(params.key, step, V)))
        tokens = mx.where(mx.array(sampling), drawn, tokens)
    normalizer = mx.logsumexp(z, axis=-1)  # [B]
    chosen = mx.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - normalizer
    if num_top:
        # The num_top largest (argpartition, no sort over V), then ordered among themselves.
        ids = mx.argpartition(-z, kth=num_top - 1, axis=-1)[:, :num_top]
        top_z = mx.take_along_axis(z, ids, axis=-1)
        order = mx.argsort(-top_z, axis=-1)
        top_ids = mx.take_along_axis(ids, order, axis=-1).astype(mx.int32)
        top_lp = mx.take_along_axis(top_z, order, axis=-1) - normalizer[:, None]
    else:
        top_ids, top_lp = mx.zeros((B, 0), mx.int32), mx.zeros((B, 0), mx.float32)
    top_lp = mx.where(mx.isfinite(top_lp), top_lp, FILTERED_LOGPROB)
    return SampleResult(tokens, chosen, top_ids, top_lp)


def _penalize(x: mx.array, params: SamplingParams, history: mx.array) -> mx.array:
    """Repetition (HF), then presence and frequency (OpenAI) penalties over the window."""
    (B, V), W = x.shape, history.shape[1]
    last_n = np.asarray(params.repeat_last_n, np.int64)
    n = np.where(last_n < 0, W, last_n)  # [B]
    in_window = mx.array(np.arange(W)[None, :] >= W - n[:, None]) & (history >= 0) & (history < V)
    ids = mx.where(in_window, history, V)  # V is a spare column, dropped after the scatter
    counts = mx.zeros((B, V + 1), mx.float32).at[mx.arange(B)[:, None], ids].add(1.0)[:, :V]
    seen = counts > 0
    p = _column(params.repeat_penalty)
    x = mx.where(seen, mx.where(x < 0, x * p, x / p), x)
    return x - _column(params.frequency_penalty) * counts - _column(params.presence_penalty) * seen


def _column(values: np.ndarray, dtype=np.float32) -> mx.array:
    return mx.array(np.asarray(values, dtype))[:, None]


def _filter(x: mx.array, params: SamplingParams) -> mx.array:
    """HF's TopK, TopP, MinP warpers (min_tokens_to_keep=1).

    Top-k and top-p need the largest logits in order. A row with a top-k of at most C =
    ``CANDIDATES`` (Ollama's default is 40) is filtered among its C largest logits
    (``mx.topk``, then a sort of those C), which decide its cut exactly: tokens outside
    them that the top-k keeps are tied with its k-th logit, and the nucleus counts their
    mass. Any other row that filters (a top-k above C, a nucleus with top-k off) sorts
    its vocabulary: the JAX kernel decides those from the logits (a nucleus that closes
    among the candidates), which here would read the logits on the host. Which path a
    row takes depends on its parameters alone; both are computed only when some row
    needs them, and a row keeps its own path's result whatever its batch.
    """
    B, V = x.shape
    C = min(CANDIDATES, V)
    top_k, top_p = np.asarray(params.top_k, np.int64), np.asarray(params.top_p, np.float32)
    top_k_on = (top_k > 0) & (top_k < V)
    cuts = top_k_on | (top_p < 1)
    by_sort = cuts & ~(top_k_on & (top_k <= C) & (C < V))
    by_candidates = cuts & ~by_sort
    out = x
    if by_sort.any():
        cut = _cut(x, top_k, top_k_on, top_p, mx.sort(x, axis=-1), with_tail=False)
        out = mx.where(mx.array(by_sort)[:, None], cut, out)
    if by_candidates.any():
        asc = mx.sort(mx.topk(x, C, axis=-1), axis=-1)  # mx.topk's order is unspecified
        cut = _cut(x, top_k, top_k_on, top_p, asc, with_tail=True)
        out = mx.where(mx.array(by_candidates)[:, None], cut, out)
    # Min-p: p >= min_p * p_max, i.e. x - x_max >= log(min_p), with no softmax over V.
    log_min_p = mx.log(mx.array(np.asarray(params.min_p, np.float32)))[:, None]
    keep = out - mx.max(out, axis=-1, keepdims=True) >= log_min_p
    return mx.where(keep, out, -mx.inf)


def _cut(x: mx.array, top_k: np.ndarray, top_k_on: np.ndarray, top_p: np.ndarray, asc: mx.array,
         *, with_tail: bool) -> mx.array:
    """Top-k then top-p of x [B, V] given ``asc`` [B, n]: its n largest logits, ascending
    (the whole row sorted, or its candidates with ``with_tail``). The k-th largest and
    everything tied with it are kept; then the low tail whose cumulative mass is
    <= 1 - top_p is dropped, the top token always kept."""
    n = asc.shape[-1]
    k = np.minimum(top_k, n)
    kth = mx.take_along_axis(asc, mx.array(np.clip(n - k, 0, n - 1).astype(np.int32))[:, None], axis=-1)
    kth = mx.where(mx.array(top_k_on)[:, None], kth, -mx.inf)  # [B, 1]
    x, asc = mx.where(x >= kth, x, -mx.inf), mx.where(asc >= kth, asc, -mx.inf)
    if with_tail:  # kept tokens outside the candidates all equal the k-th: their mass,
        # from a count over V and the candidates' exponentials (no softmax over V)
        outside = (mx.sum(x >= kth, axis=-1) - mx.sum(asc >= kth, axis=-1)).astype(mx.float32)[:, None]
        top = asc[:, -1:]
        tied = outside * mx.exp(kth - top)  # exactly 0 without such ties
        tail = (tied / (mx.sum(mx.exp(asc - top), axis=-1, keepdims=True) + tied))[:, 0]
    else:
        tail = mx.zeros((x.shape[0],), mx.float32)
    # Ascending, the cumulative mass starts with everything outside the candidates.
    cum = tail[:, None] + mx.cumsum(mx.softmax(asc, axis=-1) * (1 - tail)[:, None], axis=-1)
    drop = (cum <= mx.array(1 - top_p)[:, None]) & (mx.arange(n) < n - 1)
    # cum never decreases, so drop is a prefix: its length is the first kept position.
    first = mx.sum(drop, axis=-1).astype(mx.int32)[:, None]
    cut = mx.take_along_axis(asc, first, axis=-1)
    return mx.where((x >= cut) | mx.array(top_p >= 1)[:, None], x, -mx.inf)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix32(h: mx.array) -> mx.array:
    """Chris Wellons' lowbias32, a 32-bit integer hash with near-ideal avalanche."""
    h = (h ^ (h >> 16)) * mx.array(0x7FEB352D, mx.uint32)
    h = (h ^ (h >> 15)) * mx.array(0x846CA68B, mx.uint32)
    return h ^ (h >> 16)


def _exponentials(key: np.ndarray, step: np.ndarray, V: int) -> mx.array:
    """[B, V] independent Exp(1) noise; ``argmax(z - log E)`` is a draw from softmax(z)
    (the exponential race, i.e. Gumbel-max).

    MLX's own generator takes one key per call, so a per-row key would mean a call per
    row (20000 of them in a test); instead the noise is counter-based, vectorized over
    the batch: on the host, the row's 64-bit seed (key = [hi, lo] uint32, the layout of
    ``mx.random.key(seed)``) and its step give a 64-bit row key (the step-th output of
    splitmix64 seeded with the mixed seed); on the device, token v's 32 random bits are
    lowbias32(lowbias32(v ^ hi) + lo) of that key. A row's noise thus depends on its key
    and step only, never on its batch or slot; MLX's draws differ from JAX's.
    """
    key = np.asarray(key, np.uint64).reshape(-1, 2)
    seed = (key[:, 0] << np.uint64(32)) | key[:, 1]
    with np.errstate(over="ignore"):
        state = _splitmix64(seed) + np.uint64(0x9E3779B97F4A7C15) * (np.asarray(step).astype(np.uint64)
                                                                      + np.uint64(1))
        row = _splitmix64(state)
    hi = mx.array((row >> np.uint64(32)).astype(np.uint32))[:, None]
    lo = mx.array((row & np.uint64(0xFFFFFFFF)).astype(np.uint32))[:, None]
    bits = _mix32(_mix32(mx.arange(V, dtype=mx.uint32)[None, :] ^ hi) + lo)  # [B, V]
    # v in (0, 1), fine near 0 (where it matters), capped below 1: E = -log(1 - v) > 0.
    v = mx.minimum((bits.astype(mx.float32) + 0.5) * 2.0**-32, 1 - 2.0**-24)
    return -mx.log1p(-v)
