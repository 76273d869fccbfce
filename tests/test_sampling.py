"""mrs.sampling: per-row parameters, HF/OpenAI semantics, seeds, distribution, no recompiles.

The behaviour tests run against each backend's sampler (``backend``: the JAX kernel, and
the MLX one where ``mlx`` imports); tests of JAX internals (compilations, 64-bit types,
its candidate filter, its HLO) stay JAX-only. Shapes stay fixed (B=4 rows, V=64 tokens,
W=16 history) so hypothesis draws reuse one compilation. Random logits are continuous
normals, so ties have probability zero; where float rounding could flip a filter at its
boundary, the oracle test rejects that draw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mrs.backends.jax.sampling import _filter, process_logits, sample_jit
from mrs.errors import InvalidParameterError
from mrs.sampling import (
    DEFAULTS,
    FILTERED_LOGPROB,
    SamplingParams,
)

try:
    import mlx.core as mx
except ImportError:  # the MLX sampler's tests skip; the JAX ones still run
    mx = None

B, V, W, NUM_TOP = 4, 64, 16, 5
BACKENDS = ["jax", pytest.param("mlx", marks=pytest.mark.skipif(mx is None, reason="mlx is not installed"))]
backends = pytest.mark.parametrize("backend", BACKENDS)
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
process_jit = jax.jit(process_logits)
# Jitted once: run eagerly, each call re-traces and compiles the filter's branches (~1 s).
filter_jit = jax.jit(_filter)

row_strategy = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    "top_k": st.one_of(st.just(0), st.integers(1, V + 10)),
    "top_p": st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    "min_p": st.one_of(st.just(0.0), st.floats(1e-3, 0.5)),
    "repeat_penalty": st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
    "repeat_last_n": st.integers(-1, W + 4),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "seed": st.integers(0, 2**64 - 1),
})
rows_strategy = st.lists(row_strategy, min_size=B, max_size=B)
inputs_strategy = st.tuples(st.integers(0, 2**32 - 1), st.floats(0.1, 8.0))


def make_batch(rows: list[dict]) -> SamplingParams:
    return SamplingParams.stack([SamplingParams.make(**r) for r in rows])


def make_inputs(seed: int, scale: float, n_rows: int = B) -> tuple[np.ndarray, np.ndarray]:
    """Random [n, V] logits and [n, W] right-aligned histories that repeat likely tokens."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n_rows, V)) * scale).astype(np.float32)
    history = np.full((n_rows, W), -1, np.int32)
    for r in range(n_rows):
        n = int(rng.integers(0, W + 1))
        likely = np.argsort(-logits[r])[:8]
        pool = np.where(rng.random(n) < 0.5, rng.choice(likely, n), rng.integers(0, V, n))
        history[r, W - n:] = pool
    return logits, history


def field(params: SamplingParams, name: str) -> np.ndarray:
    return np.asarray(getattr(params, name))


def window_counts(params: SamplingParams, history: np.ndarray, r: int, vocab: int = V) -> np.ndarray:
    n = int(field(params, "repeat_last_n")[r])
    window = history[r, W - (W if n < 0 else min(n, W)):]
    return np.bincount(window[window >= 0], minlength=vocab).astype(np.float32)


def penalized_ref(logits: np.ndarray, params: SamplingParams, history: np.ndarray):
    """Repetition (HF formula), then presence/frequency (OpenAI formula), in float32."""
    out = logits.astype(np.float32).copy()
    for r in range(len(out)):
        c = window_counts(params, history, r, out.shape[1])
        p = field(params, "repeat_penalty")[r]
        x = np.where(c > 0, np.where(out[r] < 0, out[r] * p, out[r] / p), out[r])
        out[r] = (x - field(params, "frequency_penalty")[r] * c
                  - field(params, "presence_penalty")[r] * (c > 0).astype(np.float32))
    return out


def tempered_ref(logits, params, history) -> np.ndarray:
    t = field(params, "temperature")
    return penalized_ref(logits, params, history) / np.where(t == 0, 1, t)[:, None]


def softmax(y: np.ndarray) -> np.ndarray:
    e = np.exp(y - y.max())
    return e / e.sum()


def filtered_probs_ref(y: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Definitions, in float64: k largest; smallest set of mass >= top_p; p >= min_p*max."""
    y = y.astype(np.float64)
    keep = np.ones(len(y), bool)
    if 0 < top_k < len(y):
        keep &= y >= np.sort(y)[::-1][top_k - 1]
    p = softmax(np.where(keep, y, -np.inf))
    if top_p < 1:
        keep &= np.array([p[p > pi].sum() < top_p for pi in p])
    p = softmax(np.where(keep, y, -np.inf))
    keep &= p >= min_p * p.max()
    return softmax(np.where(keep, y, -np.inf))


def _mlx_kwargs(**kw) -> dict:
    return {name: None if a is None else mx.array(np.asarray(a)) for name, a in kw.items()}


def run(backend: str, logits, params, history, step, **kw) -> list[np.ndarray]:
    """The backend's sample(), its results as numpy."""
    step = np.asarray(step, np.int32)
    if backend == "jax":
        out = sample_jit(logits, params, history, step, num_top=NUM_TOP, **kw)
    else:
        from mrs.backends.mlx.sampling import sample

        out = sample(mx.array(np.asarray(logits)), params, mx.array(np.asarray(history, np.int32)), step,
                     num_top=NUM_TOP, **_mlx_kwargs(**kw))
    return [np.asarray(a) for a in out]


def process(backend: str, logits, params, history, logit_bias=None) -> np.ndarray:
    """The backend's process_logits(), as numpy."""
    if backend == "jax":
        return np.asarray(process_jit(logits, params, history, logit_bias))
    from mrs.backends.mlx.sampling import process_logits as mlx_process

    return np.asarray(mlx_process(mx.array(np.asarray(logits)), params, mx.array(np.asarray(history, np.int32)),
                                  **_mlx_kwargs(logit_bias=logit_bias)))


def filtered(backend: str, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Top-k, top-p and min-p alone (no penalties, temperature 1): the JAX kernel's
    `_filter`, or the MLX kernel's process_logits at temperature 1 (x / 1 is exact)."""
    if backend == "jax":
        return np.asarray(filter_jit(jnp.asarray(logits), params).logits)
    params = dataclasses.replace(params, temperature=np.ones_like(params.temperature),
                                 repeat_penalty=np.ones_like(params.repeat_penalty),
                                 presence_penalty=np.zeros_like(params.presence_penalty),
                                 frequency_penalty=np.zeros_like(params.frequency_penalty))
    return process(backend, logits, params, np.full((len(logits), W), -1, np.int32))


@backends
@SETTINGS
@given(rows_strategy, inputs_strategy)
def test_result_is_a_valid_token_with_logprobs_of_the_processed_logits(backend, rows, inputs):
    params, (logits, history) = make_batch(rows), make_inputs(*inputs)
    logp = np.asarray(jax.nn.log_softmax(process(backend, logits, params, history), axis=-1))
    for step in range(4):
        tokens, lp, top_ids, top_lp = run(backend, logits, params, history, [step] * B)
        assert tokens.dtype == np.int32 and ((tokens >= 0) & (tokens < V)).all()
        assert np.isfinite(lp).all() and np.isfinite(top_lp).all()
        np.testing.assert_allclose(lp, logp[np.arange(B), tokens], rtol=1e-5, atol=1e-5)
        expected = np.take_along_axis(logp, top_ids, axis=1)
        np.testing.assert_allclose(top_lp, np.where(np.isfinite(expected), expected,
                                                    FILTERED_LOGPROB), rtol=1e-5, atol=1e-5)
        assert (np.diff(top_lp, axis=1) <= 0).all()
        assert (top_ids[:, 0] == logp.argmax(axis=1)).all()


@backends
@SETTINGS
@given(rows_strategy, inputs_strategy)
def test_top_k_one_is_argmax(backend, rows, inputs):
    rows = [{**r, "top_k": 1} for r in rows]
    params, (logits, history) = make_batch(rows), make_inputs(*inputs)
    argmax = penalized_ref(logits, params, history).argmax(axis=1)
    for step in range(4):
        assert (run(backend, logits, params, history, [step] * B)[0] == argmax).all()


@backends
@SETTINGS
@given(rows_strategy, inputs_strategy)
def test_temperature_zero_is_argmax_of_the_penalized_logits(backend, rows, inputs):
    rows = [{**r, "temperature": 0.0} for r in rows]
    params, (logits, history) = make_batch(rows), make_inputs(*inputs)
    argmax = penalized_ref(logits, params, history).argmax(axis=1)
    for step in range(4):
        assert (run(backend, logits, params, history, [step] * B)[0] == argmax).all()


@backends
@SETTINGS
@given(rows_strategy, inputs_strategy)
def test_tokens_outside_top_k_nucleus_or_min_p_are_never_sampled(backend, rows, inputs):
    params, (logits, history) = make_batch(rows), make_inputs(*inputs)
    y = tempered_ref(logits, params, history)
    for step in range(8):
        tokens = run(backend, logits, params, history, [step] * B)[0]
        for r, tok in enumerate(tokens):
            k, top_p = int(field(params, "top_k")[r]), float(field(params, "top_p")[r])
            if k > 0:
                assert (y[r] > y[r, tok]).sum() < k
            in_k = y[r] >= (np.sort(y[r])[::-1][k - 1] if 0 < k < V else -np.inf)
            p = softmax(np.where(in_k, y[r], -np.inf).astype(np.float64))
            assert p[p > p[tok]].sum() < top_p + 1e-5  # inside the nucleus
            ratio = math.exp(float(y[r, tok]) - float(y[r].max()))  # p / max(p)
            assert ratio >= field(params, "min_p")[r] - 1e-5


@backends
@SETTINGS
@given(rows_strategy, inputs_strategy)
def test_processed_logits_equal_transformers_logits_processors(backend, rows, inputs):
    params, (logits, history) = make_batch(rows), make_inputs(*inputs)
    ours = process(backend, logits, params, history)
    for r in range(B):
        scores = torch.from_numpy(logits[r:r + 1].copy())
        counts = window_counts(params, history, r)
        seen = torch.from_numpy(np.flatnonzero(counts))[None]
        penalty = float(field(params, "repeat_penalty")[r])
        if seen.numel():
            scores = RepetitionPenaltyLogitsProcessor(penalty)(seen, scores)
        scores = (scores - float(field(params, "frequency_penalty")[r]) * torch.from_numpy(counts)
                  - float(field(params, "presence_penalty")[r])
                  * torch.from_numpy((counts > 0).astype(np.float32)))
        t, k = float(field(params, "temperature")[r]), int(field(params, "top_k")[r])
        top_p, min_p = float(field(params, "top_p")[r]), float(field(params, "min_p")[r])
        ids = torch.zeros((1, 1), dtype=torch.long)
        if t > 0:
            scores = TemperatureLogitsWarper(t)(ids, scores)
        if k > 0:
            scores = TopKLogitsWarper(k)(ids, scores)
        if top_p < 1:  # reject draws where float rounding could flip the nucleus boundary
            cum = np.cumsum(np.sort(softmax(scores[0].double().numpy())))
            assume(np.abs(cum - (1 - top_p)).min() > 1e-5)
            scores = TopPLogitsWarper(top_p)(ids, scores)
        probs = softmax(scores[0].double().numpy())
        assume(min_p == 0 or (np.abs(probs / probs.max() - min_p) > 1e-4 * min_p).all())
        expected = MinPLogitsWarper(min_p)(ids, scores)[0].numpy()
        np.testing.assert_array_equal(np.isfinite(ours[r]), np.isfinite(expected))
        np.testing.assert_allclose(ours[r], expected, rtol=1e-6, atol=1e-6)


@backends
@SETTINGS
@given(rows_strategy, rows_strategy, inputs_strategy, inputs_strategy, st.integers(0, B - 1))
def test_changing_one_row_never_changes_another_rows_result(backend, rows, others, inputs, other_inputs,
                                                            j):
    (logits, history), (logits2, history2) = make_inputs(*inputs), make_inputs(*other_inputs)
    steps = np.arange(B) * 3
    before = run(backend, logits, make_batch(rows), history, steps)
    rows[j] = others[j]
    logits[j], history[j], steps[j] = logits2[j], history2[j], 99
    after = run(backend, logits, make_batch(rows), history, steps)
    keep = np.arange(B) != j
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[keep], b[keep])


def stream(backend: str, params: SamplingParams, slot: int, seed: int, n_steps: int = 12) -> list:
    """Tokens of the request in `slot` over `n_steps` steps, the other rows churning."""
    rng, out = np.random.default_rng(seed), []
    for step in range(n_steps):
        logits, history = make_inputs(1000 + step, 3.0, params.batch_size)
        step_vec = rng.integers(0, 1000, params.batch_size).astype(np.int32)
        step_vec[slot] = step
        logits[slot] = make_inputs(step, 3.0, 1)[0][0]
        history[slot] = make_inputs(step, 3.0, 1)[1][0]
        tokens, lp, _, _ = run(backend, logits, params, history, step_vec)
        out.append((int(tokens[slot]), float(lp[slot])))
    return out


REQUEST = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1234}


@backends
def test_same_seed_gives_the_same_tokens_and_another_seed_does_not(backend):
    first = stream(backend, make_batch([REQUEST] * B), 0, seed=0)
    assert stream(backend, make_batch([REQUEST] * B), 0, seed=0) == first
    assert stream(backend, make_batch([{**REQUEST, "seed": 4321}] * B), 0, seed=0) != first


@backends
def test_token_stream_does_not_depend_on_which_requests_share_the_batch(backend):
    request = SamplingParams.make(**REQUEST)
    alone = stream(backend, request, 0, seed=0)
    neighbours = make_batch([{**REQUEST, "seed": s, "temperature": 0.7} for s in range(B)])
    assert stream(backend, neighbours.replace_row(2, request), 2, seed=1) == alone
    assert stream(backend, neighbours.replace_row(0, request), 0, seed=2) == alone


def chi2_sf(stat: float, df: int) -> float:
    """Chi-square survival function: regularised upper gamma Q(df/2, stat/2), as in
    Numerical Recipes (series below a + 1, Lentz's continued fraction above)."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    prefix = math.exp(a * math.log(x) - x - math.lgamma(a))
    if x < a + 1:
        term = total = 1 / a
        n = 0
        while term > 1e-16 * total:
            n += 1
            term *= x / (a + n)
            total += term
        return 1 - total * prefix
    tiny, b = 1e-300, x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an, b = -i * (i - a), b + 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return prefix * h


def assert_draws_follow_the_filtered_distribution(configs: list[dict], logits: np.ndarray, history: np.ndarray,
                                                  n: int = 20000, filters: bool = True,
                                                  backend: str = "jax") -> None:
    """Draw n tokens per config (one row per config) and chi-square them against the
    float64 definition of the filtered, renormalised distribution (and, when the
    configs ``filters`` anything, tell it apart from the unfiltered one)."""
    vocab = logits.shape[1]
    one = make_batch(configs)
    y = tempered_ref(logits, one, history)
    k = len(configs)
    params = jax.tree.map(lambda a: np.tile(a, (n,) + (1,) * (a.ndim - 1)), one)  # c0, c1, ..
    tokens = run(backend, np.tile(logits, (n, 1)), params, np.tile(history, (n, 1)), np.repeat(np.arange(n), k))[0]
    for c, cfg in enumerate(configs):
        expected = n * filtered_probs_ref(y[c], cfg["top_k"], cfg["top_p"], cfg.get("min_p", 0.0))
        counts = np.bincount(tokens[c::k], minlength=vocab)
        support = expected > 0
        assert counts[~support].sum() == 0 and expected[support].min() >= 5
        stat = (((counts - expected) ** 2)[support] / expected[support]).sum()
        assert chi2_sf(stat, int(support.sum()) - 1) > 1e-6
        if filters:
            unfiltered = n * softmax(y[c].astype(np.float64))  # the test can tell them apart
            assert chi2_sf((((counts - unfiltered) ** 2) / unfiltered).sum(), vocab - 1) < 1e-6


@pytest.mark.slow   # 20,000 draws per config; CI runs it, `-m 'not slow'` skips it
@backends
def test_empirical_frequencies_match_the_filtered_renormalised_distribution(backend):
    for x in (0.5, 3.0, 40.0, 3000.0):  # closed forms for df = 2 and 4
        assert math.isclose(chi2_sf(x, 2), math.exp(-x / 2), rel_tol=1e-9)
        assert math.isclose(chi2_sf(x, 4), math.exp(-x / 2) * (1 + x / 2), rel_tol=1e-9)
    configs = [
        {"temperature": 0.7, "top_k": 12, "top_p": 1.0, "seed": 7},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.8, "min_p": 0.05, "repeat_penalty": 1.3,
         "presence_penalty": 0.5, "frequency_penalty": 0.3, "repeat_last_n": 8, "seed": 8},
    ]
    logits, history = make_inputs(0, 2.0, 1)
    assert_draws_follow_the_filtered_distribution(configs, np.repeat(logits, 2, axis=0),
                                                  np.repeat(history, 2, axis=0), backend=backend)


@pytest.mark.slow   # 20,000 draws per config; CI runs it, `-m 'not slow'` skips it
@backends
def test_draws_over_a_vocabulary_wider_than_the_candidates_follow_the_distribution(backend):
    """Rows whose support lies among the candidates draw among them; the others (a
    min-p-only row, a top-k above the candidates) draw over the whole vocabulary."""
    from mrs.sampling import CANDIDATES

    vocab = 4 * CANDIDATES
    normal = np.random.default_rng(5).standard_normal(vocab)
    configs = [
        {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "seed": 1},                   # nucleus among candidates
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.1, "seed": 2},     # whole vocabulary
        {"temperature": 1.0, "top_k": CANDIDATES + 20, "top_p": 1.0, "min_p": 0.02, "seed": 3},  # sorted
    ]
    logits = np.stack([normal * 3, normal * 2, normal * 1.5]).astype(np.float32)
    assert_draws_follow_the_filtered_distribution(configs, logits, np.full((3, W), -1, np.int32), backend=backend)


@contextlib.contextmanager
def count_compilations():
    """Yield a list that grows by one per XLA backend compilation inside the block."""
    compiled: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_changing_parameter_values_after_warm_up_triggers_no_compilation():
    logits, history = make_inputs(0, 2.0)
    bias = np.zeros((B, V), np.float32)
    params = make_batch([{}] * B)
    run("jax", logits, params.replace_row(0, SamplingParams.make()), history, [0] * B, logit_bias=bias)
    variants = [
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 1.0, "seed": 2**63},
        {"temperature": 1e-3, "top_k": 1, "top_p": 0.01, "repeat_penalty": 10.0,
         "repeat_last_n": -1, "presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"temperature": 5.0, "top_k": 2**31 - 1, "top_p": 0.5, "min_p": 0.2,
         "repeat_penalty": 0.1, "repeat_last_n": 0, "seed": 0},
        {"temperature": 1, "top_k": V + 1, "repeat_last_n": 2**40, "seed": -5},
    ]
    with count_compilations() as compiled:
        for i, v in enumerate(variants):
            params = params.replace_row(i % B, SamplingParams.make(**v))
            bias[i % B, i] = -np.inf if i % 2 else 3.0
            logits, history = make_inputs(i, 1.0 + i)
            run("jax", logits, params, history, [i] * B, logit_bias=bias)
            run("jax", logits, make_batch([v] * B), history, np.arange(B) + i, logit_bias=bias)
    assert compiled == []


@backends
def test_penalties_count_only_the_last_repeat_last_n_tokens(backend):
    history = np.full((B, W), -1, np.int32)
    history[:, -5:] = [3, 9, 9, 3, 5]  # most recent last
    logits = np.zeros((B, V), np.float32)
    logits[:, [3, 5, 9]] = [2.0, -2.0, 4.0]
    base = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 2.0,
            "presence_penalty": 0.5, "frequency_penalty": 0.25}
    params = make_batch([{**base, "repeat_last_n": n} for n in (2, 0, -1, 64)])
    out = process(backend, logits, params, history)
    # last 2 = [3, 5]: 3 -> 2/2 - 0.25 - 0.5, 5 -> -2*2 - 0.25 - 0.5; 9 untouched
    assert out[0, [3, 5, 9]].tolist() == [0.25, -4.75, 4.0]
    assert out[1, [3, 5, 9]].tolist() == [2.0, -2.0, 4.0]  # 0: no penalty at all
    for r in (2, 3):  # -1 and more than the window: all of it, 3 and 9 twice
        assert out[r, [3, 5, 9]].tolist() == [1.0 - 1.0, -4.75, 2.0 - 1.0]
    assert (out[:, 10:] == 0).all()


@backends
def test_logit_bias_is_added_before_the_penalties_and_can_ban_a_token(backend):
    logits, history = np.zeros((B, V), np.float32), np.full((B, W), -1, np.int32)
    logits[:, 7], history[:, -1] = -1.0, 7
    bias = np.zeros((B, V), np.float32)
    bias[:, 7] = 4.0
    rows = [{"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 2.0}] * B
    out = process(backend, logits, make_batch(rows), history, bias)
    assert out[0, 7] == 1.5  # (-1 + 4) / 2, not -1 * 2 + 4
    bias[:, :] = 0.0
    bias[:, :V // 2] = -np.inf
    params = make_batch([{"temperature": 2.0, "top_k": 0, "top_p": 1.0, "seed": s}
                         for s in range(B)])
    for step in range(10):
        assert (run(backend, logits, params, history, [step] * B, logit_bias=bias)[0] >= V // 2).all()


@backends
def test_top_logprobs_outside_the_filtered_support_are_a_large_finite_negative(backend):
    logits, history = make_inputs(3, 2.0)
    params = make_batch([{"top_k": 2, "top_p": 1.0, "seed": s} for s in range(B)])
    _, _, top_ids, top_lp = run(backend, logits, params, history, [0] * B)
    assert (top_lp[:, 2:] == np.float32(FILTERED_LOGPROB)).all()
    assert np.isfinite(top_lp).all() and (top_lp[:, :2] > -100).all()
    assert all(len(set(r)) == NUM_TOP for r in top_ids.tolist())


def test_make_fills_defaults_and_derives_keys_from_seeds():
    p = SamplingParams.make(seed=5)
    assert p.batch_size == 1
    for name, value in DEFAULTS.items():
        assert field(p, name)[0] == np.asarray(value, field(p, name).dtype)
    assert field(p, "temperature").dtype == np.float32 and field(p, "top_k").dtype == np.int32
    np.testing.assert_array_equal(field(p, "key")[0],
                                  jax.random.key_data(jax.random.PRNGKey(5)))
    assert field(SamplingParams.make(seed=2**63), "key")[0].tolist() == [2**31, 0]
    assert field(SamplingParams.make(seed=2**40 + 3), "key")[0].tolist() == [2**8, 3]
    assert field(SamplingParams.make(seed=-1), "key")[0].tolist() == [2**32 - 1] * 2
    assert field(SamplingParams.make(), "key").tolist() != field(SamplingParams.make(),
                                                                 "key").tolist()
    accepted = SamplingParams.make(temperature=np.float32(0), top_k=40.0, top_p=1, min_p=1,
                                   repeat_last_n=-1, presence_penalty=-2, seed=np.int64(3))
    assert field(accepted, "top_k")[0] == 40


def test_stack_and_replace_row_touch_only_their_rows():
    params = make_batch([{"seed": s, "temperature": 0.1 * s} for s in range(B)])
    new = SamplingParams.make(temperature=0.0, top_k=3, seed=99)
    replaced = params.replace_row(2, new)
    for name in DEFAULTS.keys() | {"key"}:
        old, got = field(params, name), field(replaced, name)
        np.testing.assert_array_equal(got[[0, 1, 3]], old[[0, 1, 3]])
        np.testing.assert_array_equal(got[2], field(new, name)[0])
    with pytest.raises(ValueError):
        params.replace_row(B, new)
    with pytest.raises(ValueError):
        params.replace_row(0, params)


@pytest.mark.parametrize(("name", "value", "valid"), [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), "finite"), ("temperature", "hot", ">= 0"),
    ("top_k", -1, ">= 0"), ("top_k", 2.5, "integer"), ("top_k", True, "integer"),
    ("top_k", float("nan"), "integer"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", float("nan"), "(0, 1]"),
    ("min_p", -0.1, "[0, 1]"), ("min_p", 1.1, "[0, 1]"),
    ("repeat_penalty", 0.0, "> 0"), ("repeat_penalty", float("inf"), "> 0"),
    ("repeat_last_n", -2, ">= -1"), ("repeat_last_n", "64", ">= -1"),
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", -3, "[-2, 2]"),
    ("frequency_penalty", float("nan"), "[-2, 2]"),
    ("seed", 1.5, "integer"), ("seed", "42", "integer"), ("seed", True, "integer"),
])
def test_out_of_range_or_mistyped_parameters_raise_an_error_naming_them(name, value, valid):
    with pytest.raises(InvalidParameterError) as error:
        SamplingParams.make(**{name: value})
    assert error.value.name == name and name in str(error.value) and valid in str(error.value)


def test_candidate_filtering_equals_the_full_sort_and_the_definitions():
    """The C largest logits decide top-k <= C and nuclei that close among them; wider
    filters sort the vocabulary. Either way, the support is the definitions' (float64)."""
    from mrs.backends.jax.sampling import CANDIDATES, _filter_with

    filter_with_jit = jax.jit(_filter_with)
    vocab = 1000
    normal = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (vocab,)))

    def check(cases, expect_within):
        logits = jnp.asarray(np.stack([normal * scale for *_, scale in cases]), jnp.float32)
        params = SamplingParams.stack([SamplingParams.make(top_k=k, top_p=p, min_p=m, seed=0)
                                       for k, p, m, _ in cases])
        z, top_ids, within = (np.asarray(a) for a in filter_jit(logits, params))
        by_sort = filter_with_jit(logits, params, jnp.sort(logits, axis=-1), jnp.zeros((len(cases),))).logits
        np.testing.assert_array_equal(np.isfinite(z), np.isfinite(np.asarray(by_sort)))
        for r, (k, p, m, _) in enumerate(cases):
            support = filtered_probs_ref(np.asarray(logits[r]), k, p, m) > 0
            np.testing.assert_array_equal(np.isfinite(z[r]), support, err_msg=f"row {r}: {cases[r]}")
            assert within[r] == (set(np.flatnonzero(support)) <= set(top_ids[r]))
        np.testing.assert_array_equal(within, expect_within)

    # (top_k, top_p, min_p, logit scale): at scale 12 most mass is on a few dozen tokens.
    # Decided by the candidates: no sort.
    check([(40, 0.9, 0.0, 3), (1, 0.5, 0.0, 3), (CANDIDATES, 0.95, 0.05, 3), (0, 1.0, 0.1, 3),
           (7, 1.0, 0.0, 3), (0, 0.9, 0.0, 12), (vocab + 5, 0.8, 0.0, 12)],
          [True, True, True, True, True, True, True])
    # A top-k above C, and a nucleus wider than the candidates, need the sort.
    check([(CANDIDATES + 36, 1.0, 0.0, 3), (40, 0.9, 0.0, 3)], [False, True])
    check([(0, 0.9, 0.0, 1), (0, 0.9, 0.0, 12)], [False, True])


@backends
def test_each_filter_path_keeps_the_definitions_support(backend):
    """Rows of every path (candidates, full sort, min-p alone) in one batch of 1000 tokens."""
    from mrs.sampling import CANDIDATES

    vocab = 1000
    normal = np.random.default_rng(3).standard_normal(vocab)
    cases = [(40, 0.9, 0.0, 3), (1, 0.5, 0.0, 3), (CANDIDATES, 0.95, 0.05, 3), (0, 1.0, 0.1, 3),
             (7, 1.0, 0.0, 3), (0, 0.9, 0.0, 12), (vocab + 5, 0.8, 0.0, 12), (CANDIDATES + 36, 1.0, 0.0, 3),
             (CANDIDATES + 36, 0.7, 0.02, 3), (0, 0.9, 0.0, 1), (0, 1.0, 0.0, 1)]
    logits = np.stack([normal * scale for *_, scale in cases]).astype(np.float32)
    params = SamplingParams.stack([SamplingParams.make(top_k=k, top_p=p, min_p=m, seed=0) for k, p, m, _ in cases])
    z = filtered(backend, logits, params)
    for r, (k, p, m, _) in enumerate(cases):
        support = filtered_probs_ref(logits[r], k, p, m) > 0
        np.testing.assert_array_equal(np.isfinite(z[r]), support, err_msg=f"row {r}: {cases[r]}")
        np.testing.assert_array_equal(z[r][support], logits[r][support])


@backends
@SETTINGS
@given(st.lists(st.fixed_dictionaries({
    "top_k": st.one_of(st.just(0), st.integers(1, 4 * V + 10)),
    "top_p": st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    "min_p": st.one_of(st.just(0.0), st.floats(1e-3, 0.5)),
    "scale": st.sampled_from([0.5, 3.0, 12.0]),
}), min_size=B, max_size=B), st.integers(0, 2**32 - 1))
def test_filtering_a_vocabulary_wider_than_the_candidates_keeps_the_definitions_support(backend, rows, seed):
    from mrs.sampling import CANDIDATES

    vocab = 4 * CANDIDATES
    normal = np.random.default_rng(seed).standard_normal((B, vocab))
    logits = (normal * np.array([r["scale"] for r in rows])[:, None]).astype(np.float32)
    params = make_batch([{"top_k": r["top_k"], "top_p": r["top_p"], "min_p": r["min_p"]} for r in rows])
    z = filtered(backend, logits, params)
    for r, row in enumerate(rows):
        y = logits[r].astype(np.float64)
        kept = y if not 0 < row["top_k"] < vocab else np.where(y >= np.sort(y)[::-1][row["top_k"] - 1], y, -np.inf)
        p = softmax(kept)
        above = np.array([p[p > pi].sum() for pi in p])
        assume(row["top_p"] == 1 or np.abs(above - row["top_p"]).min() > 1e-5)
        nucleus = filtered_probs_ref(y, row["top_k"], row["top_p"], 0.0)
        assume(row["min_p"] == 0 or (np.abs(nucleus[nucleus > 0] / nucleus.max() - row["min_p"]) > 1e-4).all())
        support = filtered_probs_ref(y, row["top_k"], row["top_p"], row["min_p"])
        np.testing.assert_array_equal(np.isfinite(z[r]), support > 0)


@pytest.mark.slow   # 20,000 draws per config; CI runs it, `-m 'not slow'` skips it
@backends
def test_ties_at_a_cut_reach_past_the_candidates_and_are_drawn(backend):
    """A cut keeps every token tied with it (as HF's warpers do), also outside the
    candidates; a nucleus then counts their mass, and the draw covers them."""
    from mrs.backends.jax.sampling import CANDIDATES

    vocab = 4 * CANDIDATES
    tied = np.array([3.0] * 5 + [0.0] * (vocab - 5), np.float32)   # 5 likely tokens, then a tie
    cases = [(40, 1.0), (40, 0.5), (0, 0.997), (0, 0.25), (40, 0.2), (2, 0.9)]  # (top_k, top_p)
    params = SamplingParams.stack([SamplingParams.make(top_k=k, top_p=p, min_p=0.0) for k, p in cases])
    z = filtered(backend, np.stack([tied] * len(cases)), params)
    for r, (k, p) in enumerate(cases):
        support = filtered_probs_ref(tied, k, p, 0.0) > 0
        np.testing.assert_array_equal(np.isfinite(z[r]), support, err_msg=f"top_k={k}, top_p={p}")
    if backend == "jax":
        _, top_ids, within = (np.asarray(a) for a in filter_jit(jnp.asarray(np.stack([tied] * len(cases))), params))
        for r, (k, p) in enumerate(cases):
            support = filtered_probs_ref(tied, k, p, 0.0) > 0
            assert within[r] == (set(np.flatnonzero(support)) <= set(top_ids[r]))
        assert list(within) == [False, False, False, True, True, True]
    assert_draws_follow_the_filtered_distribution([{"temperature": 1.0, "top_k": 40, "top_p": 1.0, "seed": 4}],
                                                  tied[None], np.full((1, W), -1, np.int32), filters=False,
                                                  backend=backend)


def test_sampling_runs_with_64_bit_jax_types():
    logits, history = make_inputs(0, 2.0)
    params = make_batch([{"temperature": t, "seed": 1} for t in (0.0, 0.8, 1.5, 0.0)])
    with jax.enable_x64(True):
        tokens, logprobs, *_ = run("jax", logits, params, history, np.zeros(B))
    assert tokens.dtype == np.int32 and np.isfinite(logprobs).all()


def test_a_rows_filter_does_not_depend_on_a_neighbour_that_sorts():
    """A nucleus the candidates decide keeps that result when another row of the batch
    needs the full sort, even with top_p right at a cut, where the two orders round apart."""
    from mrs.backends.jax.sampling import CANDIDATES

    vocab = 4 * CANDIDATES
    rng = np.random.default_rng(11)
    sorter = SamplingParams.make(top_k=CANDIDATES + 20, top_p=0.9, min_p=0.0)   # needs the sort
    for _ in range(40):
        x = jnp.asarray(rng.standard_normal((1, vocab)) * 6, jnp.float32)
        # 1 - top_p on a cumulative mass as the candidates' order computes it: right at a cut
        asc = jnp.sort(x, axis=-1)[:, -CANDIDATES:]
        tail = 1 - jnp.exp(jax.nn.logsumexp(asc) - jax.nn.logsumexp(x))
        cum = np.asarray(tail + jnp.cumsum(jax.nn.softmax(asc, axis=-1) * (1 - tail), axis=-1))[0]
        row = SamplingParams.make(top_k=0, top_p=float(np.float32(1) - np.float32(cum[CANDIDATES - 8])), min_p=0.0)
        alone = np.asarray(filter_jit(x, row).logits)
        together = np.asarray(filter_jit(jnp.concatenate([x, x]), SamplingParams.stack([row, sorter])).logits)
        np.testing.assert_array_equal(alone[0], together[0])


def test_a_step_sorts_the_vocabulary_only_in_the_branch_that_needs_it():
    """XLA rewrites lax.top_k into a full sort when its k-th value is compared with the
    logits it came from; then every step would pay for the sort the candidates avoid."""
    from mrs.sampling import CANDIDATES

    vocab = 16 * CANDIDATES
    logits = np.zeros((B, vocab), np.float32)
    params = make_batch([{"seed": 1}] * B)
    hlo = sample_jit.lower(logits, params, np.full((B, W), -1, np.int32), np.zeros(B, np.int32),
                           num_top=NUM_TOP).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    assert " sort(" not in entry, [line for line in entry.splitlines() if " sort(" in line][:2]


def test_first_argmax_is_numpys_argmax_ties_and_masked_rows_included():
    from mrs.backends.jax.sampling import first_argmax

    rows = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf] * 4, [2.0, np.nan, 5.0, 5.0], [0.0, 0.0, 0.0, 7.0]], np.float32)
    got = np.asarray(first_argmax(jnp.asarray(rows)))
    assert got[0] == 1 and got[1] == 0 and got[3] == 3 and 0 <= got[2] < 4
    wide = np.random.default_rng(0).standard_normal((3, 262144)).astype(np.float32)
    wide[1, [7, 9000]] = 50.0                       # a tie far apart: the first wins
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(wide))), wide.argmax(axis=1))


@backends
@SETTINGS
@given(st.lists(st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    "top_k": st.one_of(st.just(0), st.integers(1, 4 * V + 10)),
    "top_p": st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    "min_p": st.one_of(st.just(0.0), st.floats(1e-3, 0.5)),
    "seed": st.integers(0, 2**64 - 1),
}), min_size=2 * B, max_size=2 * B), st.integers(0, 2**32 - 1), st.integers(0, B - 1))
def test_a_rows_result_over_a_wide_vocabulary_does_not_depend_on_its_neighbours(backend, rows, seed, j):
    """Over a vocabulary wider than the candidates, rows take different filter paths (the
    candidates, the sorted vocabulary, min-p alone); a row's path and result are its own."""
    from mrs.sampling import CANDIDATES

    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, 4 * CANDIDATES)) * rng.choice([0.5, 3.0, 12.0], (B, 1))).astype(np.float32)
    history = np.full((B, W), -1, np.int32)
    before = run(backend, logits, make_batch(rows[:B]), history, np.arange(B))
    changed = [rows[B + r] if r != j else rows[r] for r in range(B)]
    others = rng.standard_normal(logits.shape).astype(np.float32) * 3
    others[j] = logits[j]
    after = run(backend, others, make_batch(changed), history, np.where(np.arange(B) == j, j, 77))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[j], b[j])


@pytest.mark.skipif(mx is None, reason="mlx is not installed")
def test_mlx_sample_compiles_nothing_and_holds_no_memory_across_changing_values(monkeypatch):
    """The MLX kernel builds a fresh lazy graph per call: new parameter values, steps and
    masks compile nothing (mx.compile is never called) and leave nothing behind."""
    from mrs.backends.mlx import sampling

    compiled = []
    monkeypatch.setattr(mx, "compile", lambda *a, **k: compiled.append(a) or a[0])
    variants = [
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 1.0, "seed": 2**63},
        {"temperature": 1e-3, "top_k": 1, "top_p": 0.01, "repeat_penalty": 10.0,
         "repeat_last_n": -1, "presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"temperature": 5.0, "top_k": 2**31 - 1, "top_p": 0.5, "min_p": 0.2,
         "repeat_penalty": 0.1, "repeat_last_n": 0, "seed": 0},
        {"temperature": 1, "top_k": V + 1, "repeat_last_n": 2**40, "seed": -5},
    ]

    def step(i, v):
        logits, history = make_inputs(i, 1.0 + i)
        bias = np.zeros((B, V), np.float32)
        bias[i % B, i] = -np.inf if i % 2 else 3.0
        out = sampling.sample(mx.array(logits), make_batch([v] * B), mx.array(history),
                              np.arange(B, dtype=np.int32) + i, num_top=NUM_TOP, logit_bias=mx.array(bias),
                              allowed=mx.array(bias > -np.inf))
        mx.eval(*out)
        assert np.isfinite(np.array(out.logprobs)).all()

    step(0, {})
    gc.collect()
    baseline = mx.get_active_memory()
    for _ in range(3):
        for i, v in enumerate(variants):
            step(i, v)
    gc.collect()
    assert compiled == [] and mx.get_active_memory() <= baseline


@pytest.mark.skipif(mx is None, reason="mlx is not installed")
def test_mlx_first_argmax_and_num_top_validation():
    from mrs.backends.mlx.sampling import first_argmax, sample

    rows = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf] * 4, [2.0, np.nan, 5.0, 5.0], [0.0, 0.0, 0.0, 7.0]], np.float32)
    got = np.array(first_argmax(mx.array(rows)))
    assert got.dtype == np.int32 and got[0] == 1 and got[1] == 0 and got[3] == 3 and 0 <= got[2] < 4
    wide = np.random.default_rng(0).standard_normal((3, 262144)).astype(np.float32)
    wide[1, [7, 9000]] = 50.0                       # a tie far apart: the first wins
    np.testing.assert_array_equal(np.array(first_argmax(mx.array(wide))), wide.argmax(axis=1))
    logits, history = make_inputs(0, 1.0)
    for bad in (-1, 21):
        with pytest.raises(InvalidParameterError):
            sample(mx.array(logits), make_batch([{}] * B), mx.array(history), np.zeros(B, np.int32), num_top=bad)
