"""Replicas behind a balancer: examples/replicas/nginx.conf, as shipped (only its ports
changed), in front of two `mrs serve` processes. Requests spread over both; a conversation
stays on one, where its prefix is reused; a replica that goes away is routed around.

nginx comes from Debian's package (.ci/run installs it and sets MRS_REQUIRE_NGINX, so there
this test cannot skip)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import ANNOUNCED, LLAMA, _fixture_root

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "replicas" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
OPTIONS = {"temperature": 0, "num_predict": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendered(front: int, replicas: list[int]) -> str:
    """The shipped file with the test's ports: the listen port, and one line per replica."""
    text = CONFIG.read_text()
    text, listens = re.subn(r"listen 127\.0\.0\.1:11434;", f"listen 127.0.0.1:{front};", text)
    servers = re.findall(r"^\s*server 127\.0\.0\.1:1143[56] .*$", text, re.MULTILINE)
    assert listens == 1 and len(servers) == 2, "the example's ports moved: update this test"
    for line, port in zip(servers, replicas):
        text = text.replace(line, re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", line))
    return text


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} not healthy:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def balanced(request, tmp_path_factory):
    """{'url': nginx's address, 'replicas': [their urls], 'processes': [...]}."""
    if NGINX is None:
        if os.environ.get("MRS_REQUIRE_NGINX"):
            pytest.fail("nginx is not installed, and this run requires it (MRS_REQUIRE_NGINX)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    root = _fixture_root(request)
    base = tmp_path_factory.mktemp("replicas")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRS_", "HF_", "OLLAMA_", "OPENAI_"))}
    processes, urls = [], []
    try:
        for i in range(2):
            home = base / f"home{i}"
            shutil.copytree(root / "llama", home / "test--llama")
            log = base / f"replica{i}.log"
            with open(log, "wb") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "mrs.server", "--port", "0", "--model", LLAMA, "--preload"],
                    cwd=base, stdout=out, stderr=subprocess.STDOUT,
                    env={**env, "MRS_HOME": str(home), "MRS_CONFIG": str(base / "none.toml"), "MRS_DEVICE": "cpu",
                         "MRS_API_KEY": "", "MRS_COMPILE_CACHE": "off", "JAX_PLATFORMS": "cpu",
                         "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}))
        for i, process in enumerate(processes):
            log = base / f"replica{i}.log"
            deadline = time.monotonic() + 300
            while not (found := ANNOUNCED.search(log.read_text(errors="replace"))):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.1)
            urls.append(found.group(1))
            wait_healthy(urls[-1], process, log)
        front = free_port()
        prefix = base / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(rendered(front, [int(u.rsplit(":", 1)[1]) for u in urls]))
        with open(base / "nginx.log", "wb") as out:
            processes.append(subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                              stdout=out, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{front}"
        wait_healthy(url, processes[-1], base / "nginx.log", timeout=30)
        yield {"url": url, "replicas": urls, "processes": processes}
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def counts(replica: str) -> dict[tuple, float]:
    text = httpx.get(f"{replica}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def served(replicas: list[str], before: list[dict], route: str) -> list[float]:
    """How many requests to ``route`` each replica answered since ``before``."""
    key = ("mrs_requests_total", (("route", route), ("status", "200")))
    return [counts(r).get(key, 0.0) - b.get(key, 0.0) for r, b in zip(replicas, before)]


def reused(replicas: list[str], before: list[dict]) -> list[float]:
    key = ("mrs_cached_prompt_tokens_total", (("model", LLAMA),))
    return [counts(r).get(key, 0.0) - b.get(key, 0.0) for r, b in zip(replicas, before)]


def test_requests_with_different_prompts_spread_over_both_replicas(balanced):
    replicas = balanced["replicas"]
    before = [counts(r) for r in replicas]
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        for i in range(24):
            r = client.post("/api/generate", json={"model": LLAMA, "prompt": f"Request number {i} asks",
                                                  "stream": False, "options": OPTIONS})
            assert r.status_code == 200, r.text
    spread = served(replicas, before, "/api/generate")
    # Which key lands where depends on the replicas' ports (nginx hashes their addresses): with
    # 24 keys, fewer than 3 on one side has a chance of about 4e-5.
    assert sum(spread) == 24 and min(spread) >= 3, spread


def test_the_same_prompt_goes_to_the_same_replica(balanced):
    replicas = balanced["replicas"]
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        for prompt in ("A prompt sent four times", "Another prompt sent four times"):
            before = [counts(r) for r in replicas]
            for _ in range(4):
                assert client.post("/api/generate", json={"model": LLAMA, "prompt": prompt, "stream": False,
                                                          "options": OPTIONS}).status_code == 200
            assert sorted(served(replicas, before, "/api/generate")) == [0, 4]


@pytest.mark.parametrize("system", [None, "You are a helpful assistant who answers briefly."])
def test_each_conversation_stays_on_one_replica_which_reuses_its_prefix(balanced, system):
    """With or without a system prompt that every conversation shares: they still spread
    (16 conversations: all on one replica by chance has odds of 2 ** -15)."""
    replicas = balanced["replicas"]
    homes = set()
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        for n in range(16):
            before = [counts(r) for r in replicas]
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": f"Conversation {n} begins with a question about rivers"})
            for turn in range(2):
                r = client.post("/api/chat", json={"model": LLAMA, "messages": messages, "stream": False,
                                                  "options": OPTIONS})
                assert r.status_code == 200, r.text
                messages += [r.json()["message"], {"role": "user", "content": f"and then question {turn}?"}]
            where = served(replicas, before, "/api/chat")
            assert sorted(where) == [0, 2], f"conversation {n} moved between replicas: {where}"
            home = where.index(2)
            homes.add(home)
            assert reused(replicas, before)[home] > 0, "its later turns did not reuse the cached prefix"
    assert homes == {0, 1}, "every conversation went to one replica"


def test_a_client_affinity_header_outranks_the_prompt(balanced):
    replicas = balanced["replicas"]
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        places = []
        for key in [f"session-{n}" for n in range(16)]:      # all on one replica: odds of 2 ** -15
            before = [counts(r) for r in replicas]
            for i in range(2):
                r = client.post("/api/generate", headers={"X-Mrs-Affinity": key}, json={
                    "model": LLAMA, "prompt": f"Unrelated prompt {i} of {key}", "stream": False, "options": OPTIONS})
                assert r.status_code == 200
            where = served(replicas, before, "/api/generate")
            assert sorted(where) == [0, 2], where
            places.append(where.index(2))
    assert set(places) == {0, 1}


def test_a_stream_passes_through_the_balancer_whole_as_ndjson(balanced):
    body = {"model": LLAMA, "prompt": "Streams through nginx", "options": {"temperature": 0, "num_predict": 8}}
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        whole = client.post("/api/generate", json={**body, "stream": False}).json()
        with client.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            pieces = [json.loads(line) for line in r.iter_lines() if line]
    assert len(pieces) > 2 and pieces[-1]["done"]
    assert "".join(p["response"] for p in pieces) == whole["response"]


def test_a_replica_that_stops_is_routed_around(balanced):
    """Last in this module: it stops a replica."""
    replicas, processes = balanced["replicas"], balanced["processes"]
    body = {"model": LLAMA, "prompt": "Request number 0 asks", "stream": False, "options": OPTIONS}
    with httpx.Client(base_url=balanced["url"], timeout=120) as client:
        before = [counts(r) for r in replicas]
        assert client.post("/api/generate", json=body).status_code == 200
        home = served(replicas, before, "/api/generate").index(1)
        processes[home].terminate()
        processes[home].wait(30)
        for _ in range(3):
            r = client.post("/api/generate", json=body)
            assert r.status_code == 200, r.text
    other = 1 - home
    after = counts(replicas[other])
    key = ("mrs_requests_total", (("route", "/api/generate"), ("status", "200")))
    assert after.get(key, 0) - before[other].get(key, 0) == 3
