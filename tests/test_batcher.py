"""The continuous batcher on its own: new prompt buckets compile beside the running
streams, and JSON-constrained rows share a batch with free ones."""

from __future__ import annotations

import threading
import time

import pytest

import mrs
from mrs.constrain import START, feed
from mrs.engine.batcher import Batcher, Event, Request
from mrs.sampling import SamplingParams


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


class Inbox:
    """Collects one request's events with their arrival times."""

    def __init__(self):
        self.events: list[tuple[float, Event]] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append((time.perf_counter(), event))
        if event.done is not None or event.error is not None:
            self.done.set()

    @property
    def completion(self):
        assert self.done.wait(120), f"no answer within 120 s ({len(self.events)} events)"
        last = self.events[-1][1]
        if last.error is not None:
            raise last.error
        return last.done


def greedy() -> SamplingParams:
    return SamplingParams.make(temperature=0, seed=0)


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def test_a_new_prompt_bucket_compiles_while_running_streams_keep_decoding(llama, monkeypatch):
    """The new bucket's compile is held open until the running stream has taken 20 more
    tokens: a batcher that compiled on its decode loop would stall that stream and the
    held compile would time out, whatever the machine's speed or a warm cache."""
    batcher = Batcher(llama, slots=2, max_len=2048).start()   # a cache shape no other test compiles
    try:
        batcher.warmup()
        running = Inbox()
        running_request = batcher.submit(Request([5, 6, 7], running, greedy(), max_tokens=2000, ignore_eos=True))
        wait_until(lambda: len(running.events) >= 5, what="the running stream's first tokens")
        compile_prefill, widths = batcher.steps.prefill_slot, []

        def held_compile(width, cache):
            widths.append(width)
            seen = len(running.events)
            wait_until(lambda: len(running.events) >= seen + 20, timeout=30,
                       what="20 tokens of the running stream while a new bucket compiles")
            return compile_prefill(width, cache)

        monkeypatch.setattr(batcher.steps, "prefill_slot", held_compile)
        newcomer = Inbox()
        batcher.submit(Request(list(range(3, 203)), newcomer, greedy(), max_tokens=2, ignore_eos=True))  # bucket 256
        assert newcomer.completion.completion_tokens == 2
        assert widths == [256]
        assert not running.done.is_set(), "the running stream ended before the new bucket compiled"
        batcher.cancel(running_request)
        wait_until(lambda: batcher.idle, what="the cancelled stream's slot to free")
    finally:
        batcher.close()


def test_json_rows_share_the_batch_and_free_rows_keep_their_tokens(llama):
    alone = mrs.generate(llama, [9, 8, 7, 6], max_tokens=24, temperature=0, ignore_eos=True)
    batcher = Batcher(llama, slots=2, max_len=256).start()
    try:
        free, constrained = Inbox(), Inbox()
        batcher.submit(Request([9, 8, 7, 6], free, greedy(), max_tokens=24, ignore_eos=True))
        batcher.submit(Request([1, 2, 3], constrained, SamplingParams.make(temperature=1.0, seed=3),
                               max_tokens=80, format="json"))   # past the whitespace cap: "{" must come
        assert free.completion.token_ids == alone.token_ids
        text = constrained.completion.text
        state = START
        for byte in text.encode("utf-8"):
            state = feed(state, byte)
            assert state is not None, text
        assert text.lstrip().startswith("{")
    finally:
        batcher.close()
