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
    done = run_mrs("serve", "--coordinator", "auto", "--process-id", "1", env={"MRS_HOME": str(tmp_path)})
    assert done.returncode != 0 and "leave them out" in done.stderr


def test_auto_outside_a_cluster_says_it_found_no_group(tmp_path):
    from cli_process import run_mrs

    # What jax.distributed's discovery looks for (jax itself sets TPU_SKIP_MDS_QUERY on import).
    if any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST")):
        pytest.skip("this runs inside a cluster job")
    done = run_mrs("serve", "--coordinator", "auto", env={"MRS_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"})
    assert done.returncode != 0 and "found no group" in done.stderr, done.stderr[-2000:]


def test_the_mirror_port_stays_in_range():
    assert distributed.Group("h:1234", 2, 0).mirror_address == ("h", 1235)
    assert distributed.Group("auto", None, None).coordinator == "auto"
    top = object.__new__(distributed.Group)        # a port a cluster's discovery chose, not a flag
    object.__setattr__(top, "coordinator", "h:65535")
    assert top.mirror_address == ("h", 65534)


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
    from conftest import load_script

    return load_script("bench_tp").free_port_pair()


def start(model: Path, home: Path, log: Path, devices: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "MRS_COMPILE_CACHE": "off", "MRS_HOME": str(home), "MRS_API_KEY": "", "PYTHONUNBUFFERED": "1",
           **(env or {})}
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


def slurm(process: int, port: int) -> dict:
    """What Slurm sets for one task of a 2-task job on this host: jax.distributed derives the
    coordinator's port from the job id (61440 + id % 4096)."""
    assert 61440 <= port < 65535
    return {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(process), "SLURM_LOCALID": "0"}


def slurm_port() -> int:
    """A free pair of ports in the range Slurm's discovery picks from."""
    for port in range(61440 + os.getpid() % 3000, 65534):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


@pytest.mark.parametrize("stopped", ["leader", "follower"])
def test_a_process_told_to_stop_ends_the_whole_group(wide, tmp_path, stopped):
    """Started as a Slurm job would start it (`--coordinator auto`, no count or number), then
    one process gets SIGTERM: the leader's end takes its followers with it (all exit 0); a
    follower's (jax.distributed would swallow the signal) ends the leader with a clear error."""
    port = slurm_port()
    group = ["--tensor-parallel", "8", "--coordinator", "auto"]
    follower = start(wide, tmp_path / "home", tmp_path / "p1.log", 4, *group, env=slurm(1, port))
    leader = start(wide, tmp_path / "home", tmp_path / "p0.log", 4, *group, env=slurm(0, port))
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    try:
        ready(leader, logs[0])
        if stopped == "leader":
            leader.terminate()
            assert leader.wait(60) == 0, logs[0].read_text(errors="replace")[-2000:]
            assert follower.wait(30) == 0, logs[1].read_text(errors="replace")[-2000:]
        else:
            follower.terminate()
            assert follower.wait(30) != 0
            assert leader.wait(30) != 0
            assert "stopped by SIGTERM" in logs[1].read_text(errors="replace")
            assert "process 1 of the group stopped" in logs[0].read_text(errors="replace")
    finally:
        stop_all(leader, follower)


def test_in_a_group_a_model_must_span_every_device(wide, monkeypatch):
    """Fewer would put it on process 0's devices alone, and the followers would fail obscurely."""
    import jax

    import mrs

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(MrsError, match="spans all 8 devices: --tensor-parallel 8, not 4"):
        mrs.load(wide, tensor_parallel=4)
