"""The few shapes steps compile for: prompt and cache lengths padded to buckets, and the
per-row positions of a step (backend-free; every backend's steps take these)."""

from __future__ import annotations

import numpy as np

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 256


def bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power-of-two multiple of ``minimum`` holding n, capped at ``cap``."""
    size = minimum
    while size < n:
        size *= 2
    return max(min(size, cap), min(n, cap))


def step_positions(lengths, valid, width: int) -> np.ndarray:
    """[B, width] positions continuing each row from its length; -1 past ``valid[b]`` tokens."""
    lengths, valid = np.asarray(lengths, np.int32), np.asarray(valid, np.int32)
    offsets = np.arange(width, dtype=np.int32)[None, :]
    return np.where(offsets < valid[:, None], lengths[:, None] + offsets, -1).astype(np.int32)
