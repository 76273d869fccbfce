"""A chat conversation that keeps its cache between turns.

Each turn renders the whole conversation with the chat template, but prefills only
the tokens the cache does not already hold: the text rendered so far is kept with
the exact tokens the model saw for it, so the next turn appends the encoding of just
the new text (the reply's end marker, the user's message, the assistant header).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mrs.engine.generate import Completion, RunResult, run
from mrs.errors import MrsError

DEFAULT_MAX_LEN = 4096


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


class ChatSession:
    """Multi-turn chat over one cache slot; ``last_prefill_tokens`` says what a turn cost."""

    def __init__(self, model: Any, max_len: int | None = None):
        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise MrsError(f"model {model.name} has no chat template, so it cannot chat; use generate instead")
        self.model = model
        self.max_len = min(max_len or DEFAULT_MAX_LEN, model.context_length)
        self.last: Completion | None = None
        self.last_prefill_tokens = 0
        self.reset()

    def reset(self) -> None:
        """Forget the cached conversation (the next turn prefills everything)."""
        self._cache = None
        self._cached: list[int] = []    # exactly the tokens the cache holds, in order
        self._text = ""                  # rendered text known to encode as self._ids
        self._ids: list[int] = []

    def _target_ids(self, rendered: str) -> list[int]:
        tokenizer = self.model.tokenizer
        if self._text and rendered.startswith(self._text):
            return self._ids + tokenizer.encode(rendered[len(self._text):], add_special_tokens=False)
        return tokenizer.encode(rendered, add_special_tokens=False)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """How many tokens the conversation ``messages`` takes, the assistant header included."""
        return len(self._target_ids(self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)))

    def stream(self, messages: list[dict], **options: Any) -> Iterator[str]:
        """Answer the conversation ``messages``, yielding text as it is decoded."""
        rendered = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        target = self._target_ids(rendered)
        if len(target) >= self.max_len:
            raise MrsError(f"the conversation ({len(target)} tokens) no longer fits the context of "
                           f"{self.max_len}; use /clear or start a new chat")
        reuse = common_prefix(self._cached, target) if self._cache is not None else 0
        rewinds = self._cache is not None and self.model.runner.rewindable(self._cache)
        if not rewinds and (reuse != len(self._cached) or reuse >= len(target)):
            reuse = 0  # recurrent state cannot rewind: start over
        if self._cache is None or reuse == 0:
            self._cache = self.model.init_cache(1, self.max_len)
        reuse = min(reuse, len(target) - 1)
        self.last_prefill_tokens = len(target) - reuse
        result: RunResult | None = None
        try:
            for event in run(self.model, [target], cache=self._cache, reuse=[reuse], **options):
                if isinstance(event, RunResult):
                    result = event
                else:
                    yield event[1]
        finally:
            if result is None:  # interrupted or failed: the cache was handed to the backend mid-turn
                self.reset()
        assert result is not None
        self._cache, self.last = result.cache, result.completions[0]
        held = int(self.model.runner.cache_lengths(result.cache)[0])
        self._cached = (target + result.sampled[0])[:held]
        if self.model.tokenizer.decode(self.last.token_ids) == self.last.text:
            self._text, self._ids = rendered + self.last.text, target + self.last.token_ids
        else:  # a stop string cut the reply: the next turn re-encodes it
            self._text, self._ids = rendered, target
