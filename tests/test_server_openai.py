"""The OpenAI-compatible routes, driven by the real `openai` client against a live server."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import openai
import pytest
from server_fixtures import API_KEY, LLAMA, check_openai_error, sse_events

import mrs
from mrs.constrain import token_bytes

pytest_plugins = ["server_fixtures"]

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


def test_chat_completion_has_the_openai_shape(client):
    r = client.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == LLAMA
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    again = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_completion_tokens=10, temperature=0
    )
    assert again.choices[0].message.content == r.choices[0].message.content


def test_chat_stream_sends_role_then_content_then_finish_then_usage(client):
    whole = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=LLAMA,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert (
        chunks[-2].choices[0].finish_reason == "length"
        and chunks[-2].choices[0].delta.content is None
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


def test_chat_stream_helper_accumulates_the_completion(client):
    whole = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = whole.choices[0].message.content
    stop = text[
        len(text) // 2 : len(text) // 2 + 2
    ]  # finish with "stop": the helper refuses "length"
    deltas = []
    with client.chat.completions.stream(
        model=LLAMA, messages=MESSAGES, max_tokens=12, temperature=0, stop=stop
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "".join(deltas) == text[: text.index(stop)]


def test_chat_n_returns_n_choices_with_distinct_seeds(client):
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=8, n=3, seed=5, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    again = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=8, n=3, seed=5, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert r.usage.completion_tokens == 24


@pytest.fixture(scope="module")
def llama(live_server):
    """The server's llama loaded in this process, as the server loads it (CPU, float32): the
    oracle for its log-probs."""
    return mrs.load(str(live_server.home / "test--llama"), dtype="float32", device="cpu")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_logprobs(model, prompt: list[int], generated: list[int], temperature: float = 1.0):
    """[len(generated), vocab] log_softmax(logits / T) before each generated token, from one
    full-sequence forward pass of the in-process model (no cache, no sampler)."""
    logits = model.logits([prompt + generated])[0]
    return log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(generated)] / temperature)


def greedy_ids(model, prompt: list[int], count: int) -> list[int]:
    """The greedy continuation (mrs.generate in this process), checked against the argmax
    of the reference log-probs."""
    ids = mrs.generate(model, prompt, max_tokens=count, temperature=0, ignore_eos=True).token_ids
    assert [int(np.argmax(lp)) for lp in reference_logprobs(model, prompt, ids)] == ids
    return ids


def top(logprobs: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-logprobs, kind="stable")[:k]]


def token_text(model, token: int) -> str:
    return model.tokenizer.decode([token], skip_special_tokens=False)


def test_chat_logprobs_are_the_models_log_softmax_with_top_alternatives_in_order(client, llama):
    assert not llama.default_system      # the server's prompt is the bare chat template
    prompt = llama.tokenizer.encode_chat(MESSAGES)
    generated = greedy_ids(llama, prompt, 5)
    expected = reference_logprobs(llama, prompt, generated)
    pieces = token_bytes(llama.tokenizer, llama.vocab_size)
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 5
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [token_text(llama, t) for t in generated]
    for entry, token, lp in zip(content, generated, expected, strict=True):
        assert entry.logprob == pytest.approx(lp[token], abs=1e-4)
        assert entry.bytes == list(pieces[token] or b"")   # ids past the tokenizer have no text
        best = top(lp, 3)
        assert [t.token for t in entry.top_logprobs] == [token_text(llama, t) for t in best]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(lp[best], abs=1e-4)
    stream = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_chat_logprob_bytes_are_each_tokens_own_bytes_even_for_part_of_a_character(client, llama):
    pieces = token_bytes(llama.tokenizer, llama.vocab_size)
    by_text = {}
    for token, piece in enumerate(pieces):                   # a special token has no bytes: its text's
        text = token_text(llama, token)
        by_text.setdefault(text, set()).add(piece if piece is not None else text.encode("utf-8"))
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True, top_logprobs=20
    )
    alternatives = [t for entry in r.choices[0].logprobs.content for t in entry.top_logprobs]
    assert any("\ufffd" in t.token for t in alternatives)    # some alternative is part of a character
    for t in alternatives:
        assert bytes(t.bytes) in by_text[t.token], t


def test_completion_logprobs_are_the_models_log_softmax_greedy_and_at_a_temperature(client, llama):
    prompt = llama.tokenizer.encode("Once upon a time")
    greedy = greedy_ids(llama, prompt, 6)
    r = client.completions.create(model=LLAMA, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    got = r.choices[0].logprobs
    assert got.tokens == [token_text(llama, t) for t in greedy]
    for token, value, alternatives, lp in zip(greedy, got.token_logprobs, got.top_logprobs,
                                              reference_logprobs(llama, prompt, greedy), strict=True):
        assert value == pytest.approx(lp[token], abs=1e-4)
        best = top(lp, 3)
        assert list(alternatives) == [token_text(llama, t) for t in best]
        assert list(alternatives.values()) == pytest.approx(lp[best], abs=1e-4)
    # A sampling row reports the log-probs of what it draws from, log_softmax(logits / T)
    # (mrs/sampling.py). Which tokens seed 3 draws comes from mrs.generate in this process.
    drawn = mrs.generate(llama, prompt, max_tokens=6, temperature=0.5, top_k=0, top_p=1.0, min_p=0.0,
                         seed=3, ignore_eos=True).token_ids
    r = client.completions.create(
        model=LLAMA, prompt=prompt, max_tokens=6, temperature=0.5, seed=3, logprobs=2
    )
    got = r.choices[0].logprobs
    assert got.tokens == [token_text(llama, t) for t in drawn]
    for token, value, alternatives, lp in zip(drawn, got.token_logprobs, got.top_logprobs,
                                              reference_logprobs(llama, prompt, drawn, 0.5), strict=True):
        assert value == pytest.approx(lp[token], abs=1e-4)
        assert list(alternatives.values()) == pytest.approx(lp[top(lp, 2)], abs=1e-4)


# mrs/json_grammar.py's caps, written out: before the object, and in any other gap.
LEADING_WHITESPACE, GAP_WHITESPACE = 2, 65


def check_json_answer(text: str, feed_byte, state) -> None:
    """Every byte continues the JSON (or schema) automaton, and whitespace keeps to the caps."""
    data = text.encode("utf-8")
    lead = len(data) - len(data.lstrip())
    assert lead <= LEADING_WHITESPACE and data[lead:lead + 1] == b"{", text
    for byte in data:
        state = feed_byte(state, byte)
        assert state is not None, text
    outside_strings = re.sub(rb'"(\\.|[^"\\])*"?', b'""', data, flags=re.S)
    assert all(len(run) <= GAP_WHITESPACE for run in re.findall(rb"[ \t\n\r]+", outside_strings)), text


def test_json_object_response_format_needs_json_in_the_messages_and_closes_the_object(client):
    from mrs.constrain import START, feed

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=LLAMA, messages=MESSAGES, max_tokens=4, response_format={"type": "json_object"}
        )
    asked = [{"role": "user", "content": "Answer in JSON"}]
    r = client.chat.completions.create(
        model=LLAMA, messages=asked, max_tokens=40, n=6, seed=0, temperature=1.0,
        response_format={"type": "json_object"}
    )
    for choice in r.choices:
        check_json_answer(choice.message.content, feed, START)
    # The random model mostly wanders into a string it never closes; a few seeds close (on "{}").
    closed = [c for c in r.choices if c.finish_reason == "stop"]
    assert closed, [c.message.content for c in r.choices]
    for choice in closed:
        assert isinstance(json.loads(choice.message.content), dict) and choice.message.content.endswith("}")
    chunks = list(client.chat.completions.create(
        model=LLAMA, messages=asked, max_tokens=40, seed=closed[0].index, temperature=1.0, stream=True,
        response_format={"type": "json_object"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == closed[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_schema_response_format_answers_a_valid_closed_instance(client):
    from mrs.schema import compile_schema, schema_feed, start_state

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    # The random model pads every gap with whitespace up to the cap: some 50 tokens here.
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=200, n=4, temperature=2.0, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    for choice in r.choices:
        check_json_answer(choice.message.content, schema_feed, start_state(compile_schema(schema)))
        assert choice.finish_reason == "stop", choice.message.content
        assert json.loads(choice.message.content) in ({"ok": True}, {"ok": False})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def test_completions_text_stream_and_echo(client):
    r = client.completions.create(
        model=LLAMA, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 8
    streamed = list(
        client.completions.create(
            model=LLAMA, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(
        model=LLAMA, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True, logprobs=2
    )
    assert echoed.choices[0].text == "Once upon a time" + r.choices[0].text
    assert (
        len(echoed.choices[0].logprobs.tokens) == 8
        and len(echoed.choices[0].logprobs.top_logprobs[0]) == 2
    )


def test_completions_of_several_prompts_answer_each_in_order(client):
    prompts = ["Once upon a time", "The weather today"]
    each = [
        client.completions.create(model=LLAMA, prompt=p, max_tokens=6, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    r = client.completions.create(model=LLAMA, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == each


def test_models_list_and_retrieve(client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert LLAMA in ids and all(m.object == "model" for m in listed.data)
    one = client.models.retrieve(LLAMA)
    assert one.id == LLAMA and one.owned_by == "test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody/nothing")


def test_errors_use_the_openai_error_shape(client, live_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody/nothing", messages=MESSAGES)
    check_openai_error(e.value.body if "error" in e.value.body else {"error": e.value.body})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLAMA, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLAMA, messages=MESSAGES, n=100)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=live_server.url + "/v1", api_key="wrong", max_retries=0
        ).models.list()


def test_chat_stream_over_raw_http_ends_with_done(live_server):
    body = {"model": LLAMA, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with live_server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == (None, "[DONE]")
    assert all(json.loads(data)["object"] == "chat.completion.chunk" for _, data in events[:-1])


def test_embeddings_default_base64_matches_float(client, live_server, embedder):
    texts = [
        "The quick brown fox.",
        "Attention lets every position look at every earlier position.",
    ]
    r = client.embeddings.create(
        model=embedder, input=texts
    )  # the client asks for base64 by default
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    with live_server.client() as c:
        raw = c.post(
            "/v1/embeddings", json={"model": embedder, "input": texts, "encoding_format": "base64"}
        ).json()
        floats = c.post("/v1/embeddings", json={"model": embedder, "input": texts}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.array_equal(decoded, np.asarray(floats["data"][0]["embedding"], np.float32))
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    short = client.embeddings.create(model=embedder, input=texts[0], dimensions=32)
    assert len(short.data[0].embedding) == 32
