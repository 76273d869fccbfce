#!/usr/bin/env python
"""Decode speed of one model split over 1, 2, 4 ... devices (mrs.load(tensor_parallel=N)).

    python scripts/bench_tp.py --shape tinyllama-1.1b --layers 4 --tp 1 2 4 [--rounds 3]

Each measurement is a fresh process, the TP degrees alternating in order each round (these
machines drift). On a CPU the devices are simulated
(``--xla_force_host_platform_device_count``) and share the same cores, so the figures show
the split's overhead (collectives, smaller matmuls), not a speed-up; on a machine with
several accelerators they are real. Prints tok/s at batch 1 and 8 (medians) and each
process's peak RSS.
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


def child(folder: str, tp: int, batches: list[int], new_tokens: int, prompt_len: int) -> None:
    import numpy as np

    import mrs

    model = mrs.load(folder, tensor_parallel=tp)
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
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, default=4, help="the shape's depth for this bench (its widths stay)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.folder, args.child, args.batch, args.new_tokens, args.prompt_len)
        return

    import random_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model.make_random_model(args.shape, "float32", Path(tmp) / "model", layers=args.layers)
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(args.tp)}",
               "MRS_COMPILE_CACHE": "off", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        runs: dict[int, list[dict]] = {tp: [] for tp in args.tp}
        for round_ in range(args.rounds):
            order = args.tp if round_ % 2 == 0 else list(reversed(args.tp))
            for tp in order:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(tp), "--folder", str(folder), "--batch",
                     *map(str, args.batch), "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len)],
                    env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"tp={tp} failed:\n{done.stderr[-3000:]}")
                runs[tp].append(json.loads(done.stdout.split("RESULT ", 1)[1]))
                print(f"round {round_ + 1} tp={tp}: " + ", ".join(
                    f"batch {b} {runs[tp][-1][str(b)]['decode_tok_s']:.1f} tok/s" for b in args.batch), file=sys.stderr)
    base = {b: statistics.median(r[str(b)]["decode_tok_s"] for r in runs[args.tp[0]]) for b in args.batch}
    print(f"{args.shape} ({args.layers} layers), float32, {args.rounds} rounds, medians")
    print("| TP | " + " | ".join(f"batch {b} tok/s (x TP {args.tp[0]})" for b in args.batch) + " | peak RSS MB |")
    print("|---|" + "---|" * (len(args.batch) + 1))
    for tp in args.tp:
        cells = []
        for b in args.batch:
            speed = statistics.median(r[str(b)]["decode_tok_s"] for r in runs[tp])
            cells.append(f"{speed:.1f} ({speed / base[b]:.2f})")
        rss = statistics.median(r["peak_rss_mb"] for r in runs[tp])
        print(f"| {tp} | " + " | ".join(cells) + f" | {rss:.0f} |")


if __name__ == "__main__":
    main()
