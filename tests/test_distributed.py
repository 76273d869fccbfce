"""One model over two processes (mrs/distributed.py): `mrs serve --coordinator ...` on
loopback, 4 simulated CPU devices each, tensor parallel 8, answers as one process does;
a follower that dies ends the leader with a clear error, quickly."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mrs import distributed
from mrs.errors import MrsError

ANNOUNCED = re.compile(r"^mrs serving .* on (http://127\.0\.0\.1:\d+)$", re.MULTILINE)
REQUESTS = [
    {"prompt": "t5 t6 t7", "options": {"temperature": 0, "num_predict": 8}},
    {"prompt": "t9 t3", "options": {"temperature": 1.0, "seed": 5, "num_predict": 10}},
    {"prompt": "t1 t2 t3 t4", "options": {"temperature": 0.7, "top_k": 40, "seed": 11, "num_predict": 6}},
]


@pytest.mark.parametrize("coordinator, processes, process, says", [
    ("localhost", 2, 0, "HOST:PORT"), ("h:99999", 2, 0, "HOST:PORT"), ("h:1234", 1, 0, "at least 2"),
    ("h:1234", 2, 2, "0 .. 1"), ("h:1234", 2, -1, "0 .. 1"),
])
def test_a_group_is_checked_before_anything_starts(coordinator, processes, process, says):
    with pytest.raises(MrsError, match=says):
        distributed.Group(coordinator, processes, process)


def test_the_group_flags_go_together(tmp_path):
    from cli_process import run_mrs

    done = run_mrs("serve", "--coordinator", "127.0.0.1:5000", "--num-processes", "2",
                   env={"MRS_HOME": str(tmp_path)})
    assert done.returncode != 0 and "go together" in done.stderr


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A random Llama with 8 query heads (tensor parallel 8 needs them), 2 layers."""
    from conftest import load_script

    return load_script("random_model").make_random_model(
        "smollm2-135m", "float32", tmp_path_factory.mktemp("group") / "wide", layers=2,
        overrides={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2})


def free_port_pair() -> int:
    """A port p with p + 1 free as well (the coordinator, and the leader's mirror channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


def start(model: Path, home: Path, log: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "MRS_COMPILE_CACHE": "off", "MRS_HOME": str(home), "MRS_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mrs.cli", "serve", "--model", str(model), "--port", "0",
                                 "--preload", *extra], env=env, stdout=out, stderr=subprocess.STDOUT)


def ready(process: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = ANNOUNCED.search(text)
        if found:
            url = found.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{text[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"the server did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def answers(url: str) -> list:
    """Each request's whole reply text and its streamed pieces (as the client sees them)."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in REQUESTS:
            whole = client.post("/api/generate", json={"model": "wide", "raw": True, "stream": False, **body}).json()
            with client.stream("POST", "/api/generate", json={"model": "wide", "raw": True, **body}) as r:
                pieces = [json.loads(line) for line in r.iter_lines() if line]
            out.append((whole["response"], whole["context"], [p["response"] for p in pieces], pieces[-1]["done"]))
    return out


def stop_all(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_two_processes_serve_one_model_as_one_process_does(wide, tmp_path):
    single = start(wide, tmp_path / "home", tmp_path / "single.log", 1)
    try:
        expected = answers(ready(single, tmp_path / "single.log"))
    finally:
        stop_all(single)
    assert len({text for text, *_ in expected}) > 1, "the requests should not all answer alike"

    port = free_port_pair()
    group = ["--tensor-parallel", "8", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    follower = start(wide, tmp_path / "home", tmp_path / "p1.log", 4, *group, "--process-id", "1")
    leader = start(wide, tmp_path / "home", tmp_path / "p0.log", 4, *group, "--process-id", "0")
    try:
        url = ready(leader, tmp_path / "p0.log")
        got = answers(url)
        assert got == expected
        for text, _, pieces, done in got:
            assert "".join(pieces) == text and done

        follower.kill()                 # the group cannot go on: the leader says so and ends
        killed = time.monotonic()
        leader.wait(60)
        took = time.monotonic() - killed
        log = (tmp_path / "p0.log").read_text(errors="replace")
        assert "mrs: process 1 of the group stopped" in log, log[-2000:]
        assert leader.returncode != 0 and took < distributed.HEARTBEAT_SECONDS, took
    finally:
        stop_all(leader, follower)


def test_a_leader_that_stops_takes_its_followers_with_it(wide, tmp_path):
    port = free_port_pair()
    group = ["--tensor-parallel", "8", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    follower = start(wide, tmp_path / "home", tmp_path / "p1.log", 4, *group, "--process-id", "1")
    leader = start(wide, tmp_path / "home", tmp_path / "p0.log", 4, *group, "--process-id", "0")
    try:
        ready(leader, tmp_path / "p0.log")
        leader.terminate()
        assert leader.wait(60) == 0, (tmp_path / "p0.log").read_text(errors="replace")[-2000:]
        assert follower.wait(30) == 0, (tmp_path / "p1.log").read_text(errors="replace")[-2000:]
    finally:
        stop_all(leader, follower)
