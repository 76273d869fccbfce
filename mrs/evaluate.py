"""Evaluating a model on text. Perplexity is computed the way llama.cpp's ``llama-perplexity`` does,
so a quantization can be checked against its source with numbers comparable to llama.cpp's.

The text is tokenized once (with BOS, as llama.cpp does) and cut into windows of
``context`` tokens; a window's first token is replaced by BOS when the tokenizer adds one; each
window runs on its own, and only the predictions of its second half are scored (the
first half is context), so every scored token sees at least ``context / 2`` before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrs.errors import InvalidParameterError, MrsError


@dataclass
class Perplexity:
    """exp(mean negative log-likelihood) over ``tokens`` scored tokens in ``windows`` windows."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def perplexity(model: Any, text: str, context: int = 512, batch_size: int = 4) -> Perplexity:
    """Perplexity of ``model`` on ``text`` in windows of ``context`` tokens (llama.cpp's method)."""
    started = time.perf_counter()
    if model.family.kind != "causal":
        raise MrsError(f"model {model.name} is an {model.family.kind} model: it has no perplexity")
    if model.tokenizer is None:
        raise MrsError(f"model {model.name} has no tokenizer, so it cannot score a text")
    if not isinstance(text, str):
        raise InvalidParameterError("text", type(text).__name__, "a string")
    if isinstance(context, bool) or not isinstance(context, int) or not 4 <= context <= model.context_length:
        raise InvalidParameterError("context", context, f"an integer in [4, {model.context_length}]")
    ids = model.tokenizer.encode(text)
    windows = len(ids) // context
    if windows == 0:
        raise InvalidParameterError("text", f"{len(ids)} tokens",
                                    f"at least one window of {context} tokens (a longer text or a smaller context)")
    bos = model.tokenizer.token_id(model.tokenizer.bos_token)
    adds_bos = bos is not None and ids[:1] == [bos]
    first = context // 2
    total, count = 0.0, 0
    chunks = np.asarray(ids[:windows * context], np.int32).reshape(windows, context)
    if adds_bos:
        chunks[:, 0] = bos
    for start in range(0, windows, batch_size):
        batch = chunks[start:start + batch_size]
        logits = model.logits(batch)[:, first:context - 1].astype(np.float64)     # predicts first+1 .. end
        targets = batch[:, first + 1:]
        top = logits.max(axis=-1, keepdims=True)
        logz = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
        chosen = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total += float((logz - chosen).sum())
        count += targets.size
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, windows, context, time.perf_counter() - started)
