#!/usr/bin/env python
"""Soak `mrs serve`: N streaming clients for S seconds, then check nothing is left behind.

Starts a server on a fixture model (8 slots, queue 64), runs ``--streams`` clients that
each send streamed /api/generate requests back to back for ``--seconds``, and samples the
server's resident memory every few seconds. Reports requests, tokens, refusals (503) and
errors, the memory at the start, middle and end of the run, and the busy slots and
queued requests once the clients stop (all should be 0).

    python scripts/soak_server.py [--model .fixtures/llama] [--streams 64] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench_server import REPO, start_server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_loop(url: str, i: int, until: float, totals: dict, lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        n = 0
        while time.monotonic() < until:
            body = {"model": "bench/model", "prompt": f"Soak {i}.{n}:", "raw": True,
                    "options": {"num_predict": 48, "temperature": 0.8, "seed": i * 1000 + n}}
            n += 1
            try:
                with c.stream("POST", "/api/generate", json=body) as r:
                    if r.status_code == 503:
                        key = "refused"
                        r.read()
                        time.sleep(float(r.headers.get("retry-after", "1")))
                        tokens = 0
                    elif r.status_code != 200:
                        key, tokens = "errors", 0
                    else:
                        lines = [json.loads(line) for line in r.iter_lines() if line]
                        bad = any("error" in x for x in lines) or not lines[-1].get("done")
                        key, tokens = ("errors", 0) if bad else ("answered", lines[-1].get("eval_count", 0))
            except httpx.HTTPError:
                key, tokens = "errors", 0
            with lock:
                totals[key] += 1
                totals["tokens"] += tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / ".fixtures" / "llama")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, 8, 512, Path(tmp))
        try:
            with httpx.Client(base_url=url, timeout=120) as c:   # load and warm the model first
                c.post("/api/generate", json={"model": "bench/model", "prompt": "warm", "raw": True,
                                              "stream": False, "options": {"num_predict": 4}}).raise_for_status()
            totals = {"answered": 0, "refused": 0, "errors": 0, "tokens": 0}
            lock, memory = threading.Lock(), [(0.0, rss_mb(proc.pid))]
            started = time.monotonic()
            until = started + args.seconds
            with ThreadPoolExecutor(args.streams) as pool:
                for i in range(args.streams):
                    pool.submit(client_loop, url, i, until, totals, lock)
                while time.monotonic() < until:
                    time.sleep(min(5.0, max(0.0, until - time.monotonic())))
                    memory.append((time.monotonic() - started, rss_mb(proc.pid)))
            elapsed = time.monotonic() - started
            time.sleep(1.0)
            with httpx.Client(base_url=url, timeout=30) as c:
                batch = next(m["batch"] for m in c.get("/api/ps").json()["models"] if m["name"] == "bench/model")
        finally:
            proc.terminate()
            proc.wait(30)
    mid = memory[len(memory) // 2]
    print(f"{args.streams} streams for {elapsed:.0f} s on {args.model.name}: {totals['answered']} answered "
          f"({totals['tokens']} tokens, {totals['tokens'] / elapsed:.0f} tok/s), {totals['refused']} refused (503), "
          f"{totals['errors']} errors")
    print(f"server RSS MB: start {memory[0][1]:.0f}, at {mid[0]:.0f} s {mid[1]:.0f}, end {memory[-1][1]:.0f}; "
          f"max {max(m for _, m in memory):.0f}")
    print(f"after the run: busy slots {batch['busy']}, queued {batch['queued']}")


if __name__ == "__main__":
    main()
