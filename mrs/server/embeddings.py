"""Embeddings for /api/embed, /api/embeddings and /v1/embeddings, over `mrs.embed`.

The encoder runs in a worker thread (one call at a time per model), so the event loop
and the decode loops of other models keep going.
"""

from __future__ import annotations

import asyncio

import numpy as np

from mrs.engine.models import Loaded
from mrs.errors import ContextLengthError, MrsError


def _run(loaded: Loaded, texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
    from mrs.embedding import embed_texts, embedder

    model = loaded.model
    runner = embedder(model)  # a clear 400 if the model cannot embed
    with loaded.lock:
        if not truncate:
            runner.tokenizer.no_truncation()
            try:
                longest = max(len(e.ids) for e in runner.tokenizer.encode_batch(texts))
            finally:
                runner.tokenizer.enable_truncation(runner.max_length)
            if longest > runner.max_length:
                raise ContextLengthError(f"an input of {longest} tokens exceeds the model's limit of "
                                         f"{runner.max_length}; shorten it or send truncate: true")
        result = embed_texts(model, texts)
    return np.asarray(result.vectors, np.float32), int(sum(result.token_counts))


async def run(loaded: Loaded, texts: list[str], *, truncate: bool = True) -> tuple[np.ndarray, int]:
    """Embed texts -> ([n, dim] float32 as the model's pipeline pools them, prompt tokens), off the event loop."""
    if not texts:
        return np.zeros((0, 0), np.float32), 0
    return await asyncio.get_running_loop().run_in_executor(None, _run, loaded, texts, truncate)


def shape(vectors: np.ndarray, dimensions: int | None, *, normalize: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components and L2-normalise (Matryoshka-style truncation)."""
    if dimensions is not None and vectors.size:
        if dimensions > vectors.shape[1]:
            raise MrsError(f"dimensions={dimensions} exceeds the model's embedding size {vectors.shape[1]}")
        vectors = vectors[:, :dimensions]
    if normalize and vectors.size:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors
