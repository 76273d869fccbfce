#!/usr/bin/env python
"""Throughput of `mrs serve` under concurrent clients (continuous batching) on a fixture model.

Starts a server (single process, as `mrs serve`) over a temporary models directory holding
one model folder, then sends the same set of streaming /api/generate requests with 1, 8 and
32 concurrent clients, and reports generated tokens per second for each, against the same
requests sent one at a time.

    python scripts/bench_server.py [--model .fixtures/llama] [--requests 64] [--tokens 64]
                                   [--clients 1 8 32] [--max-batch 8 32] [--url URL]

With --url, an already running server is measured instead (its model must be --name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, context: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    home = workdir / f"home-{max_batch}"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "bench--model").exists():
        shutil.copytree(model, home / "bench--model")
    return launch(home, "bench/model", workdir, MRS_MAX_BATCH=str(max_batch), MRS_MAX_CONTEXT=str(context),
                  MRS_MAX_QUEUE="256")


def launch(home: Path, model: str, workdir: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`python -m mrs.server` over ``home`` with ``model`` preloaded and MRS_* ``settings``
    (nothing from this shell's MRS_* environment); returns it once /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRS_")}
    env.update(MRS_HOME=str(home), MRS_CONFIG=str(workdir / "none.toml"), JAX_PLATFORMS="cpu", **settings)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mrs-bench-jax-cache"))
    proc = subprocess.Popen([sys.executable, "-m", "mrs.server", "--port", str(port), "--model", model,
                             "--preload"], cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not become healthy")


def one_request(client: httpx.Client, name: str, i: int, tokens: int) -> int:
    body = {"model": name, "prompt": f"Request {i}:", "raw": True,
            "options": {"num_predict": tokens, "temperature": 0.8, "seed": i}}
    with client.stream("POST", "/api/generate", json=body) as r:
        r.raise_for_status()
        final = {}
        for line in r.iter_lines():
            final = json.loads(line)
    return int(final.get("eval_count", 0))


def measure(url: str, name: str, clients: int, requests: int, tokens: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) for ``requests`` requests over ``clients`` concurrent clients."""
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        one_request(client, name, -1, 4)  # warm the connection and the prompt bucket
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            counts = list(pool.map(lambda i: one_request(client, name, i, tokens), range(requests)))
        seconds = time.perf_counter() - started
    return sum(counts) / seconds, sum(counts), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / ".fixtures" / "llama")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--url", help="measure a running server instead of starting one")
    ap.add_argument("--name", default="bench/model", help="model name on a --url server")
    args = ap.parse_args()

    def report(label: str, url: str, name: str) -> None:
        print(f"\n{label}: {args.requests} requests x {args.tokens} tokens (streaming /api/generate)")
        print(f"{'clients':>8} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs 1 client':>12}")
        base = None
        for clients in args.clients:
            rate, count, seconds = measure(url, name, clients, args.requests, args.tokens)
            base = base or rate
            print(f"{clients:>8} {count:>8} {seconds:>8.2f} {rate:>9.1f} {rate / base:>11.2f}x", flush=True)

    if args.url:
        report(args.url, args.url, args.name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in args.max_batch:
            proc, url = start_server(args.model, max_batch, args.context, Path(tmp))
            try:
                report(f"--max-batch {max_batch}, model {args.model.name}, CPU", url, "bench/model")
            finally:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
