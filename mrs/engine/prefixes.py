"""Which free cache slot holds the longest prefix of a new request, llama.cpp's slot reuse.

A finished request's slot keeps its state (the prompt, then the generated tokens decode
steps fed) until another request needs the slot; a new request goes to the free slot
holding the longest prefix of its tokens, so only the rest is prefilled. With a fixed set
of slots this costs no memory and no copies, where a block-level prefix index (vLLM's)
would need a paged cache; the price is that a prefix is found only in a slot that is
free. A request never waits for a cache: slots that are busy are simply not candidates,
and a request that finds no prefix worth keeping takes the least recently used free
slot, empty ones first. A recurrent (Mamba) state cannot be cut back, so it is reused
only when the slot's whole history starts the new prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOTHING = np.zeros((0,), np.int32)


class SlotPrefixes:
    """Per slot: the tokens whose state it holds while free, and when it was last left."""

    def __init__(self, slots: int, *, rewindable: bool, enabled: bool = True):
        self.rewindable, self.enabled = rewindable, enabled
        self.held = [NOTHING] * slots
        self.used = [0] * slots
        self.clock = 0

    def release(self, slot: int, prompt: Sequence[int], sampled: Sequence[int], fed: int) -> None:
        """A request left ``slot`` after decode steps fed ``fed`` of its ``sampled`` tokens.

        Only the tokens read back are known (a cancelled row's last ones may never have
        been): a KV prefix of what the slot holds is still right; a recurrent state that
        saw tokens we do not know is of no use."""
        known = min(fed, len(sampled))
        keep = self.enabled and (known == fed or self.rewindable)
        self.held[slot] = np.asarray(list(prompt) + list(sampled[:known]), np.int32) if keep else NOTHING
        self.clock += 1
        self.used[slot] = self.clock

    def take(self, slot: int) -> None:
        self.held[slot] = NOTHING

    def tokens(self, free: Sequence[int]) -> int:
        """Tokens the free slots hold for reuse (the /metrics gauge)."""
        return sum(len(self.held[i]) for i in free)

    def reusable(self, slot: int, ids: np.ndarray) -> int:
        """How many leading tokens of ``ids`` the slot's state can stand for; at least one
        token is always left to prefill (its logits give the first new token)."""
        held = self.held[slot]
        n = min(len(held), len(ids) - 1)
        if n <= 0:
            return 0
        same = held[:n] == ids[:n]
        k = n if same.all() else int(np.argmin(same))
        if k < len(held) and not self.rewindable:
            return 0          # a recurrent state is reusable only at the exact point it stands for
        return k

    def plan(self, prompt: Sequence[int], free: Sequence[int]) -> tuple[int, int]:
        """(slot, reused tokens) for a prompt among the free slots (-1 when none is free).

        The slot with the longest prefix, when at least half of what it holds is reused
        (an unrelated request that shares a system prompt should not evict a long
        conversation); otherwise the least recently used slot, empty ones first."""
        if not free:
            return -1, 0
        ids = np.asarray(prompt, np.int32)
        reuse = {i: self.reusable(i, ids) for i in free}
        best = max(free, key=lambda i: (reuse[i], -self.used[i]))
        if reuse[best] and 2 * reuse[best] >= len(self.held[best]):
            return best, reuse[best]
        oldest = min(free, key=lambda i: (len(self.held[i]) > 0, self.used[i]))
        return oldest, reuse[oldest]
