"""Sampling parameters and their semantics, backend-free: validated once, here, into
per-row numpy arrays that each backend turns into its own kernel inputs (the JAX
kernel is mrs/backends/jax/sampling.py).

Each row of a batch is a different request with its own temperature, top-k, seed and
penalties. They travel as per-row arrays in a `SamplingParams`, never as static
arguments, so a new value never recompiles a backend's step.

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
from dataclasses import dataclass, fields, replace
from types import MappingProxyType

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
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of a batch, one entry per row (request), as numpy arrays.

    Backends read the fields by name (the JAX backend registers the class as a pytree)."""

    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_k: np.ndarray  # [B] int32, 0 = off; >= vocab = off
    top_p: np.ndarray  # [B] float32, 1 = off
    min_p: np.ndarray  # [B] float32, 0 = off
    repeat_penalty: np.ndarray  # [B] float32, 1 = off
    repeat_last_n: np.ndarray  # [B] int32 window of history seen; -1 = all, 0 = none
    presence_penalty: np.ndarray  # [B] float32
    frequency_penalty: np.ndarray  # [B] float32
    key: np.ndarray  # [B, 2] uint32 raw threefry key data, from the request's seed

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
            key=seed_key_data(seed)[None],
        )

    @classmethod
    def stack(cls, rows: Sequence[SamplingParams]) -> SamplingParams:
        """Concatenate rows (each a batch of any size) into one batch, on the host."""
        if not rows:
            raise ValueError("SamplingParams.stack needs at least one row")
        return cls(**{f.name: np.concatenate([np.asarray(getattr(r, f.name)) for r in rows])
                      for f in fields(cls)})

    def replace_row(self, i: int, row: SamplingParams) -> SamplingParams:
        """A copy with row `i` set to the one-row `row` (for a continuous batcher's slots)."""
        if row.batch_size != 1 or not 0 <= i < self.batch_size:
            raise ValueError(f"replace_row needs a one-row SamplingParams and 0 <= i < "
                             f"{self.batch_size}, got {row.batch_size} rows and i={i}")
        changed = {}
        for f in fields(self):
            column = np.array(getattr(self, f.name), copy=True)
            column[i] = np.asarray(getattr(row, f.name))[0]
            changed[f.name] = column
        return replace(self, **changed)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.temperature.shape[0]


def seed_key_data(seed: int | None) -> np.ndarray:
    """Raw threefry key data [2] uint32 for a seed (None: a fresh random one)."""
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise InvalidParameterError("seed", seed, "an integer (or None for a random seed)")
    s = int(seed) % 2**64  # threefry seeds a 64-bit value as [high 32 bits, low 32 bits]
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


def _row(value: float, dtype: type) -> np.ndarray:
    return np.array([value], dtype=dtype)


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
