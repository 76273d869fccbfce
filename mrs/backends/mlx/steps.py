"""The MLX backend's steps: prefill and decode with sampling fused in, each returning a
pending result the engine reads one step late.

Nothing is traced or compiled: a step builds MLX's lazy graph for the model and the
sampler and starts evaluating it with ``mx.async_eval``, so the host prepares the next
step (masks, rotary tables, detokenizing) while the device runs this one. Sampling
values, steps and masks are data, as in the JAX backend, so no value ever recompiles.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mrs.backends import Sampled
from mrs.backends.mlx.sampling import SampleResult, sample
from mrs.mlx.cache import put_slot, take_slot


class MlxPending:
    """A step's SampleResult as MLX evaluates it; ``read`` waits and brings it to numpy (once)."""

    def __init__(self, result: SampleResult):
        self.result = result
        self.tokens = result.tokens
        self._read: Sampled | None = None

    def read(self, top: bool = False) -> Sampled:
        r = self.result
        if self._read is None:
            empty = np.zeros((r.tokens.shape[0], 0))
            self._read = Sampled(np.array(r.tokens), np.array(r.logprobs), empty.astype(np.int32),
                                 empty.astype(np.float32))
        if top and self._read.top_ids.shape[1] != r.top_ids.shape[1]:
            self._read = self._read._replace(top_ids=np.array(r.top_ids), top_logprobs=np.array(r.top_logprobs))
        return self._read


def _array(x: Any, dtype: Any = mx.int32) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x), dtype=dtype)


class MlxSteps:
    """The backend protocol's Steps (mrs/backends) over one MLX model."""

    def __init__(self, model: Any, vocab_size: int, num_top: int):
        self.model, self.vocab_size, self.num_top = model, vocab_size, num_top

    def sampling(self, params: Any) -> Any:
        return params                        # the sampler reads the validated numpy rows on the host

    def history(self, history: np.ndarray) -> mx.array:
        return _array(np.asarray(history, np.int32))

    def tokens(self, tokens: np.ndarray) -> mx.array:
        return _array(np.asarray(tokens, np.int32))

    def _sample(self, logits: mx.array, sampling, history, step, allowed, cache) -> MlxPending:
        result = sample(logits, sampling, _array(history), np.asarray(step, np.int32), num_top=self.num_top,
                        allowed=None if allowed is None else _array(allowed, mx.bool_))
        mx.async_eval(*result, *cache.arrays())
        return MlxPending(result)

    def prefill(self, cache, tokens, positions, sampling, history, step, allowed):
        logits, cache = self.model(_array(tokens), np.asarray(positions, np.int32), cache, last_only=True)
        return self._sample(logits[:, 0], sampling, history, step, allowed, cache), cache

    def prefill_slot(self, width: int, cache: Any):
        def run(cache, tokens, positions, slot, sampling, history, step, allowed):
            positions = np.asarray(positions, np.int32)
            row = take_slot(cache, int(slot), int(positions[0][positions[0] >= 0].min()))
            logits, row = self.model(_array(tokens), positions, row, last_only=True)
            cache = put_slot(cache, int(slot), row)
            return self._sample(logits[:, 0], sampling, history, step, allowed, cache), cache

        return run

    def decode(self, cache, tokens, sampling, history, step, active, allowed):
        tokens = _array(tokens)
        positions = np.where(np.asarray(active, bool), cache.lengths, -1).astype(np.int32)[:, None]
        logits, cache = self.model(tokens[:, None], positions, cache)
        history = mx.concatenate([_array(history)[:, 1:], tokens[:, None].astype(mx.int32)], axis=1)
        return self._sample(logits[:, 0], sampling, history, step, allowed, cache), cache, history

    def put_row(self, array: Any, slot: int, row: Any) -> mx.array:
        array, row = _array(array), _array(row)
        at = (mx.arange(array.shape[0]) == slot).reshape(-1, *([1] * (array.ndim - 1)))
        return mx.where(at, row[0].astype(array.dtype), array)

    def compiled_count(self) -> int:
        return 0                             # nothing compiles: MLX runs the graph it is given
