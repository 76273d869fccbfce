"""Bad input, auth, CORS, a full queue and disconnecting clients: the server answers each
in the route's dialect and keeps serving."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from server_fixtures import (
    ALLOWED_ORIGIN,
    API_KEY,
    LLAMA,
    SETTINGS,
    check_ollama_error,
    check_openai_error,
    sse_events,
)

pytest_plugins = ["server_fixtures"]

CHAT = {"model": LLAMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
GEN = {"model": LLAMA, "prompt": "Hi", "stream": False, "options": {"num_predict": 3}}

BAD_REQUESTS = [
    # (path, raw body, expected status)
    ("/api/generate", b"{not json", 400),
    ("/api/generate", b"[1, 2]", 400),
    ("/api/generate", b"", 400),
    ("/api/generate", b'{"model": "test/llama", "prompt": "\xff\xfe bad"}', 400),
    ("/api/generate", json.dumps({**GEN, "model": 42}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "prompt": ["x"]}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"temperature": "hot"}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"top_k": 1.5}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"temperature": -1}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"num_predict": -7}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"seed": "x"}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": {"stop": 5}}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "options": []}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "keep_alive": "soon"}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "stream": "yes"}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "images": ["aGk="]}).encode(), 400),
    ("/api/generate", json.dumps({**GEN, "model": "nobody/nothing"}).encode(), 404),
    ("/api/generate", json.dumps({**GEN, "model": "../../etc/passwd"}).encode(), 400),
    (
        "/api/generate",
        b'{"model": "test/llama", "prompt": "Hi", "options": {"temperature": NaN}}',
        400,
    ),
    ("/api/generate", json.dumps({**GEN, "prompt": "word " * 400}).encode(), 400),
    ("/api/chat", json.dumps({"model": LLAMA, "messages": "Hi"}).encode(), 400),
    (
        "/api/chat",
        json.dumps({"model": LLAMA, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
    ),
    (
        "/api/chat",
        json.dumps({"model": LLAMA, "messages": [{"role": "user", "content": 3}]}).encode(),
        400,
    ),
    (
        "/api/chat",
        json.dumps(
            {
                "model": LLAMA,
                "stream": False,
                "tools": [{"type": "function"}],
                "messages": [{"role": "user", "content": "x"}],
            }
        ).encode(),
        400,
    ),
    ("/api/embed", json.dumps({"model": LLAMA, "input": 5}).encode(), 400),
    ("/api/show", json.dumps({}).encode(), 400),
    ("/api/copy", json.dumps({"source": LLAMA, "destination": "/abs/path"}).encode(), 400),
    ("/api/copy", json.dumps({"source": "../x", "destination": "a/b"}).encode(), 400),
    ("/v1/chat/completions", b"{oops", 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": []}).encode(), 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": -1}).encode(), 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": "ten"}).encode(), 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "temperature": 7}).encode(), 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "n": 0}).encode(), 400),
    (
        "/v1/chat/completions",
        json.dumps({**CHAT, "top_logprobs": 50, "logprobs": True}).encode(),
        400,
    ),
    ("/v1/chat/completions", json.dumps({**CHAT, "stop": {"a": 1}}).encode(), 400),
    ("/v1/chat/completions", json.dumps({**CHAT, "model": "nobody/nothing"}).encode(), 404),
    (
        "/v1/chat/completions",
        json.dumps(
            {
                **CHAT,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ],
            }
        ).encode(),
        400,
    ),
    ("/v1/completions", json.dumps({"model": LLAMA, "prompt": "", "max_tokens": 2}).encode(), 400),
    (
        "/v1/completions",
        json.dumps({"model": LLAMA, "prompt": [[100000]], "max_tokens": 2}).encode(),
        400,
    ),
    ("/v1/embeddings", json.dumps({"model": LLAMA, "input": []}).encode(), 400),
    ("/v1/generate", json.dumps({"prompt": "Hi", "max_tokens": 0}).encode(), 400),
    ("/v1/generate", json.dumps({"prompt": "Hi", "temperature": True}).encode(), 400),
]


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    "path,body,status", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_REQUESTS)]
)
def test_bad_input_is_a_4xx_json_error_in_the_routes_dialect(live_server, path, body, status):
    with live_server.client() as c:
        r = c.post(path, content=body, headers=_auth())
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    (
        check_openai_error
        if path.startswith(("/v1/chat", "/v1/completions", "/v1/embeddings"))
        else check_ollama_error
    )(r.json())


def test_huge_numbers_are_capped_by_the_context(live_server):
    with live_server.client() as c:
        r = c.post(
            "/api/generate", json={**GEN, "options": {"num_predict": 10**12, "temperature": 0}}
        )
        o = c.post(
            "/v1/completions",
            json={
                "model": LLAMA,
                "prompt": "Hi",
                "max_tokens": 10**9,
                "temperature": 0,
                "stop": [],
            },
        )
    context = int(SETTINGS["MRS_MAX_CONTEXT"])
    # (Ollama's prompt_eval_count leaves out cached tokens; OpenAI's usage counts the whole prompt.)
    assert r.status_code == 200 and r.json()["eval_count"] < context
    assert o.status_code == 200 and o.json()["usage"]["total_tokens"] <= context


def _exchange(url: str, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer until the server closes: (status, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as s:
        s.sendall(request)
        answer = b""
        while data := s.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _connection_reset(error: httpx.TransportError) -> bool:
    """The server closed the connection under a request still being sent (so no answer came)."""
    if isinstance(error, httpx.RemoteProtocolError):
        return "disconnected without sending a response" in str(error)
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, (ConnectionResetError, BrokenPipeError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def test_an_oversized_body_is_413_and_the_server_keeps_serving(live_server):
    limit = int(SETTINGS["MRS_MAX_BODY_BYTES"])
    # Announced by Content-Length: refused from the headers alone, before any body is sent.
    head = (f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n").encode()
    status, body = _exchange(live_server.url, head)
    assert status == 413
    check_ollama_error(json.loads(body))
    # Sent whole: the server answers 413 and closes while the client may still be writing
    # the body, which the client then sees as a reset instead of the answer. Those two only.
    big = json.dumps({**GEN, "prompt": "x" * 100_000}).encode()
    with live_server.client() as c:
        try:
            r = c.post("/api/generate", content=big, headers=_auth())
        except httpx.TransportError as e:
            assert _connection_reset(e), repr(e)
        else:
            assert r.status_code == 413
            check_ollama_error(r.json())
    with live_server.client() as c:
        assert c.post("/api/generate", json=GEN).status_code == 200


def test_wrong_method_and_unknown_route_are_json_errors(live_server):
    with live_server.client() as c:
        r = c.get("/api/generate")
        assert r.status_code == 405
        check_ollama_error(r.json())
        r = c.get("/api/nothing-here")
        assert r.status_code == 404
        check_ollama_error(r.json())
        r = c.get("/v1/models/nobody/nothing")
        assert r.status_code == 404
        check_openai_error(r.json())


def test_api_key_is_required_except_on_root_and_health(live_server):
    assert httpx.get(live_server.url + "/").status_code == 200
    assert httpx.get(live_server.url + "/health").status_code == 200
    r = httpx.get(live_server.url + "/api/tags")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    check_ollama_error(r.json())
    r = httpx.get(live_server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    check_openai_error(r.json())


def test_cors_answers_preflight_for_allowed_origins_only(live_server):
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(live_server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(live_server.url + "/api/version", headers={"Origin": ALLOWED_ORIGIN, **_auth()})
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = httpx.get(
        live_server.url + "/api/version", headers={"Origin": "http://evil.example", **_auth()}
    )
    assert "access-control-allow-origin" not in r.headers


def test_a_full_queue_answers_503_with_retry_after(live_server):
    """8 slots + 16 queued hold 24 choices at once; one request of 2 prompts x 16 choices
    submits 32 in one go, and none of them can end meanwhile (each runs 200 greedy steps),
    so the 25th is refused and the request is a 503 — whatever else the server is doing."""
    prompts = ["Busy", "Queue"]
    body = {"model": LLAMA, "prompt": prompts, "max_tokens": 200, "temperature": 0}
    with live_server.client() as c:
        alone = c.post("/v1/completions", json=body).json()
        assert [ch["finish_reason"] for ch in alone["choices"]] == ["length"] * 2  # no early end
        r = c.post("/v1/completions", json={**body, "n": 16})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        check_openai_error(r.json())
        _wait_idle(live_server)  # the 24 it had queued were cancelled with it
        assert c.post("/v1/completions", json={**body, "max_tokens": 3}).status_code == 200


def _wait_idle(live_server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = live_server.batch_stats()
        if stats is not None and stats["busy"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, f"slots still busy after {timeout}s: {stats}"
        time.sleep(0.1)


def test_a_request_that_ends_at_its_first_token_frees_its_slot(live_server):
    with live_server.client() as c:
        r = c.post("/api/generate", json={**GEN, "options": {"num_predict": 1}})
    assert r.status_code == 200 and r.json()["eval_count"] == 1
    assert _wait_idle(live_server, timeout=10)["busy"] == 0


def _open_and_drop(url: str, path: str, body: dict) -> bool:
    """Send a streaming request over a raw socket, read until the first chunk of body, then vanish."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
        s.sendall(head + payload)
        seen = b""
        while b"\r\n\r\n" not in seen or len(seen.split(b"\r\n\r\n", 1)[1]) < 8:
            data = s.recv(4096)
            if not data:
                break
            seen += data
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )  # RST on close
    return seen.startswith(b"HTTP/1.1 200")


def test_clients_that_disconnect_mid_stream_free_their_slots(live_server):
    greedy = {"temperature": 0, "num_predict": 200}
    ollama = ("/api/generate", {"model": LLAMA, "prompt": "Drop", "raw": True, "options": greedy})
    openai = ("/v1/chat/completions", {**CHAT, "max_tokens": 200, "temperature": 0, "stream": True})
    with live_server.client() as c:  # greedy and run to the end, each would make all 200 tokens
        assert c.post(ollama[0], json={**ollama[1], "stream": False}).json()["eval_count"] == 200
        chat = c.post(openai[0], json={**openai[1], "stream": False}).json()
        assert chat["usage"]["completion_tokens"] == 200
    bodies = [ollama if i % 2 else openai for i in range(200)]
    before = _wait_idle(live_server)
    with ThreadPoolExecutor(16) as pool:
        opened = list(pool.map(lambda pb: _open_and_drop(live_server.url, *pb), bodies))
    assert sum(opened) >= 190  # every one got a 200 stream (a few may race a full queue: 503)
    after = _wait_idle(live_server)
    assert after["requests"] - before["requests"] >= 190
    # A server that kept generating after its client left would make 200 tokens per stream;
    # these are cancelled within a few decode steps of the first chunk.
    made = after["tokens"] - before["tokens"]
    assert made < 200 * sum(opened) / 10, f"{made} tokens for {sum(opened)} dropped streams"
    with live_server.client() as c:  # and the server still answers, the same as ever
        r = c.post("/v1/generate", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200
        with c.stream("POST", "/v1/generate_stream", json={"prompt": "Hi", "max_tokens": 3}) as s:
            assert sse_events(s)[-1] == ("done", "[DONE]")


def _one_stream(url: str, i: int) -> tuple[int, str | None, list[dict]]:
    """(status, Retry-After, NDJSON chunks) of one streamed /api/generate."""
    body = {"model": LLAMA, "prompt": f"Burst {i}", "raw": True,
            "options": {"num_predict": 24, "temperature": 0.7, "seed": i}}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c, \
            c.stream("POST", "/api/generate", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.headers.get("retry-after"), [r.json()]
        return 200, None, [json.loads(line) for line in r.iter_lines() if line]


def test_a_burst_of_96_streams_gets_answers_or_503s_and_leaves_every_slot_free(live_server):
    """8 slots and 16 queued: of 96 streams at once, the ones that find the queue full are
    refused with 503 and Retry-After; every other one streams to its end, none fails."""
    with ThreadPoolExecutor(96) as pool:
        results = list(pool.map(lambda i: _one_stream(live_server.url, i), range(96)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 24      # at least every slot and queue place was used
    for status, retry_after, chunks in results:
        if status == 503:
            assert int(retry_after) >= 1 and "error" in chunks[0]
        else:
            assert chunks[-1]["done"] is True and chunks[-1]["done_reason"] in ("stop", "length")
            assert not any("error" in chunk for chunk in chunks)
    stats = _wait_idle(live_server)
    assert stats["busy"] == 0 and stats["queued"] == 0
