"""Tool calling through the real clients: a named tool_choice decodes a call that follows
the function's schema (plain and streamed), Ollama's tools reach a template that takes
them, tool results go back through the template, and a model whose template takes no
tools refuses them."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest
from server_fixtures import API_KEY, LLAMA, TOOLS_LLAMA, check_openai_error

pytest_plugins = ["server_fixtures"]

# Nested objects, an optional property, a string enum, integer, number and boolean.
FORECAST = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},   # a random model rarely closes a free string
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"},
    "detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}, "threshold": {"type": "number"}},
               "required": ["hourly"]},
}, "required": ["city", "unit", "detail"]}
TOOLS = [{"type": "function", "function": {"name": "get_forecast", "description": "The weather forecast",
                                           "parameters": FORECAST}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_forecast"}}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_named_tool_choice_returns_a_call_that_follows_its_schema_plain_and_streamed(client, seed):
    options = {"model": TOOLS_LLAMA, "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 600,
               "temperature": 1.0, "seed": seed}
    r = client.chat.completions.create(**options)
    choice = r.choices[0]
    # OpenAI's finish for a call the client named is "stop" ("tool_calls" is the model's choice).
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_forecast" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, FORECAST)

    chunks = list(client.chat.completions.create(**options, stream=True))
    pieces = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_forecast" and pieces[0].type == "function"
    assert {p.index for p in pieces} == {0}
    joined = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(joined) == arguments          # same seed: the same call, whole or in pieces
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_one_of_the_tools_by_that_tools_schema(client, seed):
    r = client.chat.completions.create(model=TOOLS_LLAMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=600, temperature=1.0, seed=seed)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_auto_tool_choice_answers_in_words_when_the_model_writes_no_call(client):
    r = client.chat.completions.create(model=TOOLS_LLAMA, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(model=TOOLS_LLAMA, messages=ASK, tools=TOOLS, max_tokens=8,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content


def test_tool_results_reach_the_template(client, live_server):
    """A conversation with a call and its result answers as its rendered prompt does on
    /v1/completions: the template saw the tool message."""
    from mrs.tokenizer import Tokenizer

    call = {"id": "call_7", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_7", "content": "It is 10:04 in Paris"}]
    r = client.chat.completions.create(model=TOOLS_LLAMA, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    tokenizer = Tokenizer(live_server.home / "test--llama-tools")
    from mrs.server.schemas import openai_messages

    prompt = tokenizer.apply_chat_template(openai_messages({"messages": messages}))
    assert "It is 10:04 in Paris" in prompt and '"name": "get_time"' in prompt
    ids = tokenizer.encode(prompt, add_special_tokens=False)      # the template has its own markers
    raw = client.completions.create(model=TOOLS_LLAMA, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == raw.choices[0].text
    assert r.usage.prompt_tokens == raw.usage.prompt_tokens


def test_ollama_tools_reach_a_template_that_takes_them(ollama_client, live_server):
    shown = ollama_client.show(TOOLS_LLAMA)
    assert "tools" in shown.capabilities and "tools" not in ollama_client.show(LLAMA).capabilities
    r = ollama_client.chat(model=TOOLS_LLAMA, messages=ASK, tools=TOOLS, options={"num_predict": 8, "temperature": 0})
    assert r.message.role == "assistant" and r.message.tool_calls is None and r.done
    # The tools are in the prompt: more tokens were evaluated than without them.
    bare = ollama_client.chat(model=TOOLS_LLAMA, messages=[{"role": "user", "content": "Weather in Rome?"}],
                              options={"num_predict": 8, "temperature": 0})
    assert r.prompt_eval_count > bare.prompt_eval_count + 100
    result = ollama_client.chat(model=TOOLS_LLAMA, tools=TOOLS, options={"num_predict": 4, "temperature": 0},
                                messages=[*ASK, {"role": "assistant", "content": "", "tool_calls": [
                                    {"function": {"name": "get_time", "arguments": {}}}]},
                                          {"role": "tool", "content": "10:04", "tool_name": "get_time"}])
    assert result.done


def test_tools_for_a_model_whose_template_takes_none_are_refused(client, live_server):
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        client.chat.completions.create(model=LLAMA, messages=ASK, tools=TOOLS, max_tokens=4)
    # ... unless tool_choice says none: the tools are not used, so the request is answered.
    none = client.chat.completions.create(model=LLAMA, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4,
                                          temperature=0)
    plain = client.chat.completions.create(model=LLAMA, messages=ASK, max_tokens=4, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content
    with live_server.client() as c:
        r = c.post("/api/chat", json={"model": LLAMA, "messages": ASK, "tools": TOOLS, "stream": False})
        assert r.status_code == 400 and "does not support tools" in r.json()["error"]
        for bad in ({"tools": "all"}, {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}},
                    {"tools": [{"type": "function", "function": {"name": "a b"}}]},
                    {"messages": [*ASK, {"role": "assistant", "tool_calls": [
                        {"function": {"name": "f", "arguments": "{not json"}}]}]},
                    {"messages": [*ASK, {"role": "assistant", "tool_calls": [     # nested past the parser's depth
                        {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]},
                    {"messages": [*ASK, {"role": "assistant", "tool_calls": [
                        {"function": {"name": "f", "arguments": '{"x": NaN}'}}]}]}):
            r = c.post("/v1/chat/completions", json={"model": TOOLS_LLAMA, "messages": ASK, **bad})
            assert r.status_code == 400, (bad, r.text)
            check_openai_error(r.json())
