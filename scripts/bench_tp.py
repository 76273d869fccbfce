#!/usr/bin/env python
"""Decode speed of one model split over 1, 2, 4 ... devices (mrs.load(tensor_parallel=N)).

    python scripts/bench_tp.py --shape tinyllama-1.1b --layers 4 --tp 1 2 4 [--rounds 3]
    python scripts/bench_tp.py --tp 4 --hosts 1 2       # TP 4 in one process, and over two (2 devices each)

Each measurement is a fresh process, the TP degrees alternating in order each round (these
machines drift). On a CPU the devices are simulated
(``--xla_force_host_platform_device_count``) and share the same cores, so the figures show
the split's overhead (collectives, smaller matmuls), not a speed-up; on a machine with
several accelerators they are real. With ``--hosts``, each TP degree also runs over that
many processes joined on loopback (mrs/mirror.py: the leader mirrors every call to the
others), which shows what the mirror costs. Prints tok/s at batch 1 and 8 (medians) and the
leader's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(folder: str, tp: int, batches: list[int], new_tokens: int, prompt_len: int,
          group: tuple[str, int, int] | None = None) -> None:
    import numpy as np

    import mrs

    if group is None:
        model = mrs.load(folder, tensor_parallel=tp)
    else:
        from mrs import distributed, mirror

        joined = distributed.join(distributed.Group(*group))
        if not joined.leader:
            mirror.follow(joined, mrs.load)
            os._exit(0)
        leader = mirror.Leader(joined)
        model = leader.load(mrs.load, folder, tensor_parallel=tp)
    rng = np.random.default_rng(0)
    vocab = model.runner.vocab_size
    out = {"device": model.runner.device_name}
    for batch in batches:
        prompts = [[int(t) for t in rng.integers(3, vocab, prompt_len)] for _ in range(batch)]
        options = dict(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        mrs.generate_batch(model, prompts, **options)                   # compile and warm
        start = time.perf_counter()
        done = mrs.generate_batch(model, prompts, **options)
        wall = time.perf_counter() - start
        decode = max(c.decode_seconds for c in done)
        out[str(batch)] = {"decode_tok_s": sum(c.completion_tokens - 1 for c in done) / decode, "wall_s": wall}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)
    if group is not None:
        leader.close()
        os._exit(0)         # jax's shutdown barrier would wait for the followers, which have left


def free_port_pair() -> int:
    """A free port p with p + 1 free too: a group's coordinator and its leader's mirror."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def measure(folder: Path, tp: int, hosts: int, args: argparse.Namespace) -> dict:
    """One measurement: TP ``tp`` over ``hosts`` processes, fresh processes each time."""
    command = [sys.executable, __file__, "--child", str(tp), "--folder", str(folder), "--batch", *map(str, args.batch),
               "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len)]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(1, tp // hosts)}",
           "MRS_COMPILE_CACHE": "off", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if hosts == 1:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"tp={tp} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.split("RESULT ", 1)[1])
    port = free_port_pair()
    followers = [subprocess.Popen([*command, "--group", f"127.0.0.1:{port}", str(hosts), str(i)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(1, hosts)]
    done = subprocess.run([*command, "--group", f"127.0.0.1:{port}", str(hosts), "0"], env=env, capture_output=True,
                          text=True)
    for f in followers:
        f.wait(60)
    if done.returncode != 0 or "RESULT " not in done.stdout:
        sys.exit(f"tp={tp} over {hosts} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, default=4, help="the shape's depth for this bench (its widths stay)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1],
                        help="processes each TP degree runs over (each with TP / hosts devices)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--group", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        group = None if args.group is None else (args.group[0], int(args.group[1]), int(args.group[2]))
        child(args.folder, args.child, args.batch, args.new_tokens, args.prompt_len, group)
        return
    cases = [(tp, hosts) for tp in args.tp for hosts in args.hosts if tp % hosts == 0 and (hosts == 1 or tp > 1)]

    import random_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model.make_random_model(args.shape, "float32", Path(tmp) / "model", layers=args.layers)
        runs: dict[tuple[int, int], list[dict]] = {case: [] for case in cases}
        for round_ in range(args.rounds):
            for tp, hosts in cases if round_ % 2 == 0 else list(reversed(cases)):
                runs[tp, hosts].append(measure(folder, tp, hosts, args))
                print(f"round {round_ + 1} tp={tp} hosts={hosts}: " + ", ".join(
                    f"batch {b} {runs[tp, hosts][-1][str(b)]['decode_tok_s']:.1f} tok/s" for b in args.batch),
                    file=sys.stderr)
    base = {b: statistics.median(r[str(b)]["decode_tok_s"] for r in runs[cases[0]]) for b in args.batch}
    print(f"{args.shape} ({args.layers} layers), float32, {args.rounds} rounds, medians")
    print("| TP | processes | " + " | ".join(f"batch {b} tok/s (x the first row)" for b in args.batch)
          + " | peak RSS MB (leader) |")
    print("|---|---|" + "---|" * (len(args.batch) + 1))
    for tp, hosts in cases:
        cells = []
        for b in args.batch:
            speed = statistics.median(r[str(b)]["decode_tok_s"] for r in runs[tp, hosts])
            cells.append(f"{speed:.1f} ({speed / base[b]:.2f})")
        rss = statistics.median(r["peak_rss_mb"] for r in runs[tp, hosts])
        print(f"| {tp} | {hosts} | " + " | ".join(cells) + f" | {rss:.0f} |")


if __name__ == "__main__":
    main()
