"""The backend seam: a second, trivial backend (tests/numpy_backend.py, numpy only) runs
generate, stream, generate_batch, chat sessions and the continuous batcher unchanged."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import mrs
from mrs import backends, families
from mrs.engine.batcher import Batcher, Event, Request
from mrs.engine.session import ChatSession
from mrs.sampling import SamplingParams
from mrs.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
import numpy_backend  # noqa: E402
from numpy_backend import reference_greedy, toy_model  # noqa: E402


@pytest.fixture(scope="module")
def toy(fixture_path):
    """The toy family on the numpy backend, with the llama fixture's tokenizer and chat template."""
    return toy_model(fixture_path("llama"), Tokenizer(fixture_path("llama")))


def prompt_ids(toy, text: str) -> list[int]:
    return toy.tokenizer.encode(text)


def test_generate_on_the_numpy_backend_equals_the_toy_models_own_greedy_continuation(toy):
    ids = prompt_ids(toy, "the seam holds")
    done = mrs.generate(toy, ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert done.token_ids == reference_greedy(toy.runner.weights, ids, 12)
    assert done.finish_reason == "length" and done.prompt_tokens == len(ids)
    assert toy.runner.steps(0).calls["decode"] >= 11          # the loop went through the protocol


def test_stream_and_batch_on_the_numpy_backend_agree_with_generate(toy):
    texts = ["one prompt", "and a second, longer prompt"]
    alone = [mrs.generate(toy, t, max_tokens=10, temperature=0, ignore_eos=True) for t in texts]
    for text, done in zip(texts, alone):
        assert done.token_ids == reference_greedy(toy.runner.weights, prompt_ids(toy, text), 10)
        assert "".join(mrs.stream(toy, text, max_tokens=10, temperature=0, ignore_eos=True)) == done.text
        assert done.text == toy.tokenizer.decode(done.token_ids)
    batch = mrs.generate_batch(toy, texts, max_tokens=10, temperature=0, ignore_eos=True)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]


def test_seeded_sampling_reaches_the_backend_as_validated_rows(toy):
    runs = [mrs.generate(toy, "seeded", max_tokens=8, temperature=1.0, seed=s, ignore_eos=True).token_ids
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    with pytest.raises(mrs.MrsError, match="top_p"):
        mrs.generate(toy, "bad", top_p=2.0)


def test_constrained_rows_pass_their_masks_through_the_backend(toy):
    done = mrs.generate(toy, "json please", max_tokens=40, format="json", temperature=0)
    assert done.text.lstrip().startswith("{")
    if done.finish_reason == "stop":
        assert isinstance(json.loads(done.text), dict)


def test_a_chat_session_on_the_numpy_backend_prefills_only_the_new_turn(toy):
    session = ChatSession(toy, max_len=256)
    first = [{"role": "user", "content": "hello there"}]
    reply = "".join(session.stream(first, max_tokens=6, temperature=0, ignore_eos=True))
    whole_first = session.last_prefill_tokens
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    "".join(session.stream(second, max_tokens=6, temperature=0, ignore_eos=True))
    rendered = toy.tokenizer.apply_chat_template(second, add_generation_prompt=True)
    total = len(toy.tokenizer.encode(rendered, add_special_tokens=False))
    assert 0 < session.last_prefill_tokens < total and whole_first > 0
    # The session holds exactly the tokens the model saw: the turn's prompt, then the reply but its last token.
    target = session._cached[: len(session._cached) - 5]
    assert session.last.token_ids == reference_greedy(toy.runner.weights, target, 6)
    # An edited history shares only a prefix: a cache that cannot rewind (this toy's, like
    # Mamba's) starts over instead of reusing it.
    edited = [{"role": "user", "content": "hello there, friend"}]
    "".join(session.stream(edited, max_tokens=2, temperature=0, ignore_eos=True))
    rendered = toy.tokenizer.apply_chat_template(edited, add_generation_prompt=True)
    assert session.last_prefill_tokens == len(toy.tokenizer.encode(rendered, add_special_tokens=False))


def test_the_continuous_batcher_runs_on_the_numpy_backend(toy):
    batcher = Batcher(toy, slots=2, max_len=128).start()
    try:
        prompts = [prompt_ids(toy, t) for t in ("first request", "second one", "third, queued")]
        boxes = []
        for ids in prompts:
            box: dict = {"done": threading.Event(), "events": []}

            def sink(event: Event, box=box) -> None:
                box["events"].append(event)
                if event.done is not None or event.error is not None:
                    box["done"].set()

            batcher.submit(Request(ids, sink, SamplingParams.make(temperature=0, seed=0), max_tokens=7,
                                   ignore_eos=True, logprobs=True, top_logprobs=2))
            boxes.append(box)
        for ids, box in zip(prompts, boxes):
            assert box["done"].wait(60)
            last = box["events"][-1]
            assert last.error is None, last.error
            assert last.done.token_ids == reference_greedy(toy.runner.weights, ids, 7)
            tokens = [t for e in box["events"] for t in e.tokens]
            assert [t.id for t in tokens] == last.done.token_ids and all(len(t.top) == 2 for t in tokens)
        assert batcher.steps.calls["prefill_slot"] == 3
    finally:
        batcher.close()


def test_mrs_load_picks_a_registered_backend_by_its_device_name(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 50}))
    save_file({"unused": np.zeros(1, np.float32)}, folder / "model.safetensors")   # a model folder has weights
    monkeypatch.setitem(families.FAMILIES, "toy", numpy_backend.FAMILY)
    monkeypatch.setitem(backends.BACKENDS, "numpy", "numpy_backend")
    model = mrs.load(folder, device="numpy", dtype="auto", home=tmp_path)
    assert model.runner.backend == "numpy" and model.vocab_size == 50
    done = mrs.generate(model, [3, 4, 5], max_tokens=5, temperature=0, ignore_eos=True)
    assert done.token_ids == reference_greedy(model.runner.weights, [3, 4, 5], 5)
    np.testing.assert_allclose(model.logits([3, 4])[0, 1], model.runner.weights.next_logits(4, 1))
