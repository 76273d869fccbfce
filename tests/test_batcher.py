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
        self.done.wait(120)
        last = self.events[-1][1]
        if last.error is not None:
            raise last.error
        return last.done


def greedy() -> SamplingParams:
    return SamplingParams.make(temperature=0, seed=0)


def test_a_new_prompt_bucket_compiles_while_running_streams_keep_decoding(llama):
    batcher = Batcher(llama, slots=2, max_len=2048).start()   # a cache shape no other test compiles
    try:
        batcher.warmup()
        running = Inbox()
        running_request = batcher.submit(Request([5, 6, 7], running, greedy(), max_tokens=2000, ignore_eos=True))
        while len(running.events) < 5:
            time.sleep(0.01)
        newcomer = Inbox()
        submitted = time.perf_counter()
        batcher.submit(Request(list(range(3, 203)), newcomer, greedy(), max_tokens=2, ignore_eos=True))  # bucket 256
        assert newcomer.completion.completion_tokens == 2
        first = newcomer.events[0][0]
        assert not running.done.is_set(), "the running stream ended before the new bucket compiled"
        # Compiling the bucket took most of [submitted, first]; a decode loop that compiled it
        # itself would have sent nothing for that long.
        times = [submitted] + [t for t, e in running.events if submitted <= t <= first] + [first]
        longest_gap = max(b - a for a, b in zip(times, times[1:]))
        assert longest_gap < 0.5 * (first - submitted), (longest_gap, first - submitted)
        batcher.cancel(running_request)
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
