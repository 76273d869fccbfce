"""Sampling options reach the kernel through `mrs.generate`: every generated token is checked
against a numpy reference applied to the model's own full-sequence logits (one forward pass
over prompt + completion gives the logits each step saw, since the model is causal), and
each option changes the tokens, so a `generate` that dropped it would fail."""

from __future__ import annotations

import numpy as np
import pytest

import mrs

PROMPT = [5, 17, 17, 99, 5, 230, 17]          # repeats, so the penalties bite from the first step
NEW_TOKENS = 24
TIE = 1e-3                                    # decode vs full-sequence logits differ by ~1e-5


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


def step_logits(model, done) -> np.ndarray:
    """[NEW_TOKENS, V]: the logits from which completion token i was chosen."""
    ids = PROMPT + done.token_ids
    assert len(done.token_ids) == NEW_TOKENS
    return model.logits(ids)[0, len(PROMPT) - 1:len(ids) - 1]


def penalized(logits: np.ndarray, window: list[int], repeat=1.0, presence=0.0, frequency=0.0) -> np.ndarray:
    """HF's repetition penalty, then OpenAI's presence/frequency, over the window's counts."""
    counts = np.bincount(np.asarray(window, int), minlength=logits.shape[-1]).astype(np.float32)
    seen = counts > 0
    x = np.where(seen, np.where(logits < 0, logits * repeat, logits / repeat), logits)
    return x - frequency * counts - presence * seen


def assert_greedy_under(model, done, last_n: int = 64, **penalties) -> None:
    ids = PROMPT + done.token_ids
    for i, logits in enumerate(step_logits(model, done)):
        history = ids[:len(PROMPT) + i]
        window = history if last_n < 0 else history[len(history) - min(last_n, len(history)):]
        ref = penalized(logits, window, **penalties)
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > TIE:
            assert done.token_ids[i] == int(ref.argmax()), (i, penalties, last_n)


def greedy(model, **options):
    return mrs.generate(model, PROMPT, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **options)


@pytest.mark.parametrize("options,reference", [
    ({"repeat_penalty": 1.8}, {"repeat": 1.8}),
    ({"presence_penalty": 1.5}, {"presence": 1.5}),
    ({"frequency_penalty": 2.0}, {"frequency": 2.0}),
    ({"presence_penalty": -1.0, "frequency_penalty": 0.5, "repeat_penalty": 1.3},
     {"presence": -1.0, "frequency": 0.5, "repeat": 1.3}),
])
def test_penalties_through_generate_match_the_reference_and_change_the_tokens(llama, options, reference):
    plain, penalised = greedy(llama), greedy(llama, **options)
    assert_greedy_under(llama, plain)
    assert_greedy_under(llama, penalised, **reference)
    assert penalised.token_ids != plain.token_ids


def test_repeat_last_n_bounds_the_window_the_penalties_count(llama):
    options = {"repeat_penalty": 1.8, "frequency_penalty": 0.5}
    reference = {"repeat": 1.8, "frequency": 0.5}
    short, whole = greedy(llama, repeat_last_n=3, **options), greedy(llama, repeat_last_n=-1, **options)
    assert_greedy_under(llama, short, last_n=3, **reference)
    assert_greedy_under(llama, whole, last_n=-1, **reference)
    assert short.token_ids != whole.token_ids
    # The default window (64) holds all of these 31 tokens; none at all is no penalty.
    assert greedy(llama, **options).token_ids == whole.token_ids
    assert greedy(llama, repeat_last_n=0, **options).token_ids == greedy(llama).token_ids


def test_min_p_keeps_every_sampled_token_above_its_share_of_the_most_likely(llama):
    """min_p after temperature (HF's order): p(token) >= min_p * max p at each step. At
    temperature 2 the tiny model's distribution is flat, so without min_p the same seed
    draws tokens far below that share."""
    sampled = dict(max_tokens=NEW_TOKENS, temperature=2.0, top_k=0, top_p=1.0, seed=7, ignore_eos=True)

    def shares(done) -> np.ndarray:
        ids = np.asarray(done.token_ids)
        logits = step_logits(llama, done) / 2.0
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs[np.arange(len(ids)), ids] / probs.max(-1)

    filtered = mrs.generate(llama, PROMPT, min_p=0.4, **sampled)
    assert shares(filtered).min() >= 0.4 - 1e-4
    assert mrs.generate(llama, PROMPT, min_p=0.4, **sampled).token_ids == filtered.token_ids
    free = mrs.generate(llama, PROMPT, **sampled)
    assert shares(free).min() < 0.4
