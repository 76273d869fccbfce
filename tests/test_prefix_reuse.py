"""Prefix reuse in the continuous batcher: a finished request's slot keeps its state, and
a later request that starts with those tokens prefills only the rest, with the same
greedy tokens as a cold run (mrs.generate, and a batcher with reuse off)."""

from __future__ import annotations

import threading

import pytest

import mrs
from mrs.engine.batcher import Batcher, Event, Request
from mrs.sampling import SamplingParams


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


@pytest.fixture(scope="module")
def mamba(fixture_path):
    return mrs.load(str(fixture_path("mamba")))


@pytest.fixture(scope="module")
def batchers(llama, mamba):
    """One batcher per (model, reuse), shared by the module's tests (compiled once)."""
    made: dict[tuple[str, bool], Batcher] = {}

    def get(model, reuse: bool = True) -> Batcher:
        key = (model.name, reuse)
        if key not in made:
            made[key] = Batcher(model, slots=2, max_len=256, prefix_reuse=reuse).start()
        return made[key]

    yield get
    for batcher in made.values():
        batcher.close()


class Answer:
    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.done is not None or event.error is not None:
            self.done.set()

    def completion(self):
        assert self.done.wait(120), "no answer within 120 s"
        if self.events[-1].error is not None:
            raise self.events[-1].error
        return self.events[-1].done


def ask(batcher: Batcher, ids: list[int], max_tokens: int = 6, **kwargs):
    answer = Answer()
    batcher.submit(Request(list(ids), answer, SamplingParams.make(temperature=0, seed=0), max_tokens=max_tokens,
                           ignore_eos=True, **kwargs))
    return answer.completion()


def cold(model, ids: list[int], max_tokens: int = 6, **kwargs) -> list[int]:
    return mrs.generate(model, list(ids), max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        **kwargs).token_ids


def fresh_start(batcher: Batcher) -> None:
    """Forget what every slot holds (a test's first request then finds nothing)."""
    with batcher._cond:
        for slot in range(batcher.slots):
            batcher.prefixes.take(slot)


PROMPT = [11, 42, 7, 99, 23, 5, 61, 8, 30, 17]


def test_a_request_that_extends_a_finished_one_prefills_only_the_rest(llama, batchers):
    batcher = batchers(llama)
    fresh_start(batcher)
    first = ask(batcher, PROMPT)
    assert first.cached_tokens == 0
    longer = PROMPT + first.token_ids + [3, 14, 15, 9, 2]
    before = batcher.stats()["reused"]
    again = ask(batcher, longer)
    # The slot holds the prompt and every generated token a decode step fed (all 6: the
    # step after the last one was already dispatched when it was read back).
    assert again.cached_tokens == len(PROMPT) + 6
    assert again.prompt_tokens == len(longer)
    assert batcher.stats()["reused"] - before == len(PROMPT) + 6
    assert again.token_ids == cold(llama, longer)
    off = ask(batchers(llama, reuse=False), longer)
    assert off.cached_tokens == 0 and off.token_ids == again.token_ids


def test_a_prompt_that_diverges_reuses_only_the_common_part(llama, batchers):
    batcher = batchers(llama)
    fresh_start(batcher)
    first = ask(batcher, PROMPT)
    other = PROMPT + first.token_ids[:2] + [77, 78, 79]   # the reply edited after two tokens
    answer = ask(batcher, other)
    assert answer.cached_tokens == len(PROMPT) + 2
    assert answer.token_ids == cold(llama, other)
    # The same prompt again: everything but the last token is reused (its logits give the
    # first new token), and the tokens do not change.
    repeat = ask(batcher, other)
    assert repeat.cached_tokens == len(other) - 1 and repeat.token_ids == answer.token_ids


def test_an_unrelated_request_does_not_evict_a_held_conversation(llama, batchers):
    batcher = batchers(llama)
    fresh_start(batcher)
    conversation = ask(batcher, PROMPT, max_tokens=20)
    # Shares its first token with the conversation: an empty slot is the better home.
    unrelated = [PROMPT[0], 90, 91, 92, 93]
    assert ask(batcher, unrelated).cached_tokens in (0, 1)
    follow_up = PROMPT + conversation.token_ids + [4, 4, 4]
    answer = ask(batcher, follow_up)
    assert answer.cached_tokens == len(PROMPT) + 20
    assert answer.token_ids == cold(llama, follow_up)


def test_when_every_slot_holds_something_the_least_recently_used_is_evicted(llama, batchers):
    batcher = batchers(llama)
    fresh_start(batcher)
    a, b = [50, 51, 52, 53, 54, 55], [60, 61, 62, 63, 64, 65]
    a_out = ask(batcher, a)
    b_out = ask(batcher, b)
    ask(batcher, [70, 71, 72, 73])          # takes a's slot, the least recently used
    b_again = b + b_out.token_ids + [1]
    assert ask(batcher, b_again).cached_tokens == len(b) + 6
    a_again = a + a_out.token_ids + [1]
    evicted = ask(batcher, a_again)
    assert evicted.cached_tokens == 0
    assert evicted.token_ids == cold(llama, a_again)   # a slot's old state is never read


def test_a_cancelled_stream_leaves_a_reusable_prefix(llama, batchers):
    batcher = batchers(llama)
    fresh_start(batcher)
    seen = threading.Event()
    tokens: list[int] = []

    def sink(event: Event) -> None:
        tokens.extend(event.done.token_ids if event.done else [])
        if event.text:
            seen.set()

    request = batcher.submit(Request(list(PROMPT), sink, SamplingParams.make(temperature=0, seed=0),
                                     max_tokens=200, ignore_eos=True))
    assert seen.wait(60)
    batcher.cancel(request)
    while not batcher.idle:
        threading.Event().wait(0.01)
    generated = cold(llama, PROMPT, max_tokens=200)
    longer = PROMPT + generated[:3] + [5, 5]
    answer = ask(batcher, longer)
    assert len(PROMPT) <= answer.cached_tokens <= len(PROMPT) + 3
    assert answer.token_ids == cold(llama, longer)


def test_a_json_constrained_request_leaves_its_fed_tokens(llama, batchers):
    """Constrained rows read each token before the next step: the last one is never fed."""
    batcher = batchers(llama)
    fresh_start(batcher)
    first = ask(batcher, PROMPT, max_tokens=8, format="json")
    longer = PROMPT + first.token_ids + [6]
    answer = ask(batcher, longer)
    assert answer.cached_tokens == len(PROMPT) + len(first.token_ids) - 1
    assert answer.token_ids == cold(llama, longer)


def test_mamba_state_is_reused_only_where_it_stands(mamba, batchers):
    batcher = batchers(mamba)
    fresh_start(batcher)
    first = ask(batcher, PROMPT)
    exact = PROMPT + first.token_ids + [3, 1]
    answer = ask(batcher, exact)
    assert answer.cached_tokens == len(PROMPT) + 6
    assert answer.token_ids == cold(mamba, exact)
    # A prompt that shares most of that history but not all of it cannot cut the state
    # back: it starts from zero state, and its tokens are a cold run's.
    partial = exact + answer.token_ids[:3] + [40, 41]
    restarted = ask(batcher, partial)
    assert restarted.cached_tokens == 0
    assert restarted.token_ids == cold(mamba, partial)


def test_an_empty_slot_is_taken_before_one_that_holds_something():
    """Even when the empty slot was left more recently (a cancelled Mamba stream leaves one)."""
    from mrs.engine.prefixes import SlotPrefixes

    slots = SlotPrefixes(2, rewindable=False)
    slots.release(0, PROMPT, [1, 2], fed=2)      # a conversation
    slots.release(1, PROMPT, [1, 2], fed=3)      # cancelled: a state that saw an unknown token
    assert len(slots.held[0]) == len(PROMPT) + 2 and len(slots.held[1]) == 0 and slots.used == [1, 2]
    assert slots.plan([90, 91, 92], [0, 1]) == (1, 0)
    assert slots.plan(PROMPT + [1, 2, 7], [0, 1]) == (0, len(PROMPT) + 2)


def test_length_dependent_rotary_scaling_turns_reuse_off(fixture_path):
    """Dynamic NTK scales a step's frequencies by its length: a reused prefix's keys would
    not be a cold prefill's, so greedy output could change."""
    dynamic = mrs.load(str(fixture_path("llama-dynamic")))
    assert dynamic.config.rope.kind == "dynamic"
    assert Batcher(dynamic, slots=1, max_len=64).prefix_reuse is False
