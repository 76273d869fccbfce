"""The OpenAI-compatible routes, driven by the real `openai` client against a live server."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
from server_fixtures import API_KEY, LLAMA, check_openai_error, sse_events

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


def test_chat_logprobs_report_top_alternatives(client):
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(
            entry.top_logprobs[0].logprob
        )
        assert entry.bytes == list(entry.token.encode())


def test_json_object_response_format_needs_json_in_the_messages(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=LLAMA, messages=MESSAGES, max_tokens=4, response_format={"type": "json_object"}
        )
    r = client.chat.completions.create(
        model=LLAMA,
        messages=[{"role": "user", "content": "Answer in JSON"}],
        max_tokens=16,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=4,
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert is_json_prefix(r.choices[0].message.content)
    stream = client.chat.completions.create(
        model=LLAMA, messages=[{"role": "user", "content": "JSON please"}], max_tokens=16,
        response_format={"type": "json_object"}, temperature=1.0, seed=5, stream=True)
    assert is_json_prefix("".join(c.choices[0].delta.content or "" for c in stream if c.choices))


def test_json_schema_response_format_constrains_the_reply(client):
    from mrs.schema import compile_schema, schema_feed, start_state

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(
        model=LLAMA, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=6,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    state = start_state(compile_schema(schema))
    for byte in r.choices[0].message.content.encode("utf-8"):
        state = schema_feed(state, byte)
        assert state is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def is_json_prefix(text: str) -> bool:
    """The text starts a JSON object: the JSON automaton accepts every byte of it."""
    from mrs.constrain import START, feed

    state = START
    for byte in text.encode("utf-8"):
        state = feed(state, byte)
        if state is None:
            return False
    return text.strip() == "" or text.lstrip().startswith("{")


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
