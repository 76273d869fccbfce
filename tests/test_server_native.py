"""model-rs's own routes over raw HTTP: /health, /v1/generate, /v1/generate_stream, /v1/generate_batch;
and the OpenAI routes' sampling options and embeddings against the in-process reference
(test_server_openai.py drives those routes with the openai client for their shapes)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from server_fixtures import (
    LLAMA,
    OPTION_EFFECTS,
    RAW_EMBEDDER,
    SAMPLED,
    check_ollama_error,
    sse_events,
    with_option,
)

import mrs

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


# ---------------------------------------------------------------------------------------
# Options and embeddings against mrs.generate / mrs.embed in this process
# ---------------------------------------------------------------------------------------

PROMPT = "Once upon a time"


@pytest.mark.parametrize("option", OPTION_EFFECTS)
def test_generate_passes_each_sampling_option_to_the_sampler(live_server, llama_here, option):
    expected = with_option(llama_here, [{"role": "user", "content": PROMPT}], option)
    with live_server.client() as c:
        r = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 16, **SAMPLED,
                                         **OPTION_EFFECTS[option][0]})
    assert r.status_code == 200 and r.json()["text"] == expected.text


# OpenAI's body fields (min_p and repeat_penalty as llama.cpp's server takes them; it has no
# repeat_last_n). Its defaults differ from Ollama's, so SAMPLED is sent whole on both sides.
OPENAI_OPTIONS = [o for o in OPTION_EFFECTS if o != "repeat_last_n"]


@pytest.mark.parametrize("option", OPENAI_OPTIONS)
def test_openai_completions_pass_each_sampling_option_to_the_sampler(live_server, llama_here, option):
    prompt = llama_here.tokenizer.encode(PROMPT)
    expected = with_option(llama_here, prompt, option)
    with live_server.client() as c:
        r = c.post("/v1/completions", json={"model": LLAMA, "prompt": prompt, "max_tokens": 16, **SAMPLED,
                                            **OPTION_EFFECTS[option][0]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected.text


def test_openai_embeddings_are_mrs_embed_l2_normalised(live_server, embedder, raw_embedder_here):
    """Float or base64, for a model whose pipeline normalises and one whose does not."""
    texts = ["The quick brown fox.", "A journey of a thousand miles."]
    raw = mrs.embed(raw_embedder_here, texts)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    with live_server.client() as c:
        for model in (embedder, RAW_EMBEDDER):
            for fmt in ("float", "base64"):
                r = c.post("/v1/embeddings", json={"model": model, "input": texts, "encoding_format": fmt})
                assert r.status_code == 200, r.text
                got = [d["embedding"] for d in r.json()["data"]]
                if fmt == "base64":
                    got = [np.frombuffer(base64.b64decode(v), "<f4") for v in got]
                np.testing.assert_allclose(np.asarray(got), unit, rtol=1e-5, atol=1e-5)
            r = c.post("/v1/embeddings", json={"model": model, "input": texts[0], "dimensions": 64})
            cut = raw[0, :64]
            np.testing.assert_allclose(r.json()["data"][0]["embedding"], cut / np.linalg.norm(cut),
                                       rtol=1e-5, atol=1e-5)
        c.post("/api/embed", json={"model": RAW_EMBEDDER, "input": [], "keep_alive": 0})  # free its slot
