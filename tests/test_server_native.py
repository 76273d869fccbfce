"""model-rs's own routes over raw HTTP: /health, /v1/generate, /v1/generate_stream, /v1/generate_batch."""

from __future__ import annotations

import httpx
import pytest
from server_fixtures import LLAMA, check_ollama_error, sse_events

pytest_plugins = ["server_fixtures"]

GREEDY = {"temperature": 0, "max_tokens": 10}


def test_health_is_open_and_ok_once_preloaded(live_server):
    r = httpx.get(live_server.url + "/health")  # no API key needed
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_generate_defaults_to_the_served_model(live_server):
    with live_server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "Once upon a time", **GREEDY})
        named = c.post(
            "/v1/generate", json={"prompt": "Once upon a time", "model": LLAMA, **GREEDY}
        )
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["text"], str) and body["text"] and body["model"] == LLAMA
    assert body["completion_tokens"] == 10 and named.json()["text"] == body["text"]


def test_generate_stream_sends_token_events_then_done(live_server):
    with live_server.client() as c:
        whole = c.post("/v1/generate", json={"prompt": "Once upon a time", **GREEDY}).json()["text"]
        with c.stream(
            "POST", "/v1/generate_stream", json={"prompt": "Once upon a time", **GREEDY}
        ) as r:
            events = sse_events(r)
    assert events[-1] == ("done", "[DONE]")
    assert all(name == "token" for name, _ in events[:-1])
    assert "".join(data for _, data in events[:-1]) == whole


def test_generate_batch_equals_one_at_a_time(live_server):
    prompts = ["Once upon a time", "The weather today", "def main():"]
    with live_server.client() as c:
        each = [
            c.post("/v1/generate", json={"prompt": p, **GREEDY}).json()["text"] for p in prompts
        ]
        r = c.post("/v1/generate_batch", json={"prompts": prompts, "model": LLAMA, **GREEDY})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == LLAMA and [x["text"] for x in body["results"]] == each


@pytest.mark.parametrize(
    "body", [{"prompts": []}, {"prompts": "one"}, {"prompts": [""]}, {"prompts": [1, 2]}]
)
def test_generate_batch_rejects_empty_or_mistyped_prompts(live_server, body):
    with live_server.client() as c:
        r = c.post("/v1/generate_batch", json=body)
    assert r.status_code == 400
    check_ollama_error(r.json())


def test_generate_without_a_prompt_is_400(live_server):
    with live_server.client() as c:
        r = c.post("/v1/generate", json={"max_tokens": 3})
    assert r.status_code == 400 and "prompt" in r.json()["error"]
