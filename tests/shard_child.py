"""Run by tests/test_shard.py in a fresh process with 8 simulated CPU devices: one model
unsplit and split over each asked number of devices, and what the test checks, as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/shard_child.py MODEL TP [TP ...]
        [--quantize int8] [--batcher]

(The suite's own process has one CPU device, fixed when jax starts, hence a child.)
"""

from __future__ import annotations

import argparse
import json
import re
import threading

import jax
import numpy as np

import mrs
from mrs.engine.batcher import Batcher, Event, Request
from mrs.sampling import SamplingParams

PROMPTS = ["hello world", "The quick brown fox", "a b c d"]
TOKENS = np.array([[1, 5, 9, 23, 7, 3, 11, 4], [2, 8, 8, 30, 1, 0, 6, 12]], np.int32)


def collectives(executable) -> dict:
    """The collectives of a compiled step's HLO: how many arrays are all-reduced (XLA fuses
    several into one tuple-shaped op), and the shape of everything all-gathered; with the
    step's tokens (batch x width), which activations lead with."""
    text = executable.as_text()
    tokens = tuple(executable.args_info[0][1].shape)
    tokens = tokens if len(tokens) == 2 else tokens + (1,)     # decode takes one token per row: [B]
    reduced = 0
    gathered = []
    for line in text.splitlines():
        if re.search(r"\ball-reduce(-start)?\(", line):
            result = line.split("=", 1)[1].split("all-reduce", 1)[0]
            reduced += len(re.findall(r"[a-z]+\d*\[[\d,]*\]", result))
        if re.search(r"\ball-gather(-start)?\(", line):
            result = line.split("=", 1)[1].split("all-gather", 1)[0]
            gathered += [[int(d) for d in dims.split(",") if d]
                         for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result)]
    return {"reduced": reduced, "gathered": gathered, "tokens": list(tokens)}


def split_leaves(params) -> list[dict]:
    """Every param leaf: its full shape, its devices, and its first shard's shape."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        out.append({"name": jax.tree_util.keystr(path), "shape": list(x.shape),
                    "devices": len(x.sharding.device_set),
                    "shard": list(x.addressable_shards[0].data.shape)})
    return out


def run_batcher(model, max_tokens: int = 10) -> list[list[int]]:
    """Three greedy requests through a 2-slot continuous batcher (so one waits for a slot)."""
    batcher = Batcher(model, slots=2, max_len=128).start()
    try:
        results: list[list[int]] = [[] for _ in PROMPTS]
        done = [threading.Event() for _ in PROMPTS]

        def sink(i):
            def receive(event: Event) -> None:
                results[i].extend(event.ids)
                if event.done is not None or event.error is not None:
                    done[i].set()
            return receive

        for i, prompt in enumerate(PROMPTS):
            ids = model.tokenizer.encode(prompt)
            batcher.submit(Request(ids, sink(i), SamplingParams.make(temperature=0, seed=0), max_tokens=max_tokens,
                                   ignore_eos=True))
        for event in done:
            assert event.wait(120), "the batcher did not finish"
        return results
    finally:
        batcher.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("tp", type=int, nargs="+")
    parser.add_argument("--quantize")
    parser.add_argument("--batcher", action="store_true")
    args = parser.parse_args()
    options = {"quantize": args.quantize} if args.quantize else {}
    report: dict = {"devices": len(jax.devices())}

    def outputs(model) -> dict:
        logits = model.runner.logits(TOKENS)
        greedy = [mrs.generate(model, p, max_tokens=12, temperature=0, ignore_eos=True).token_ids for p in PROMPTS]
        seeded = [mrs.generate(model, p, max_tokens=12, temperature=0.8, seed=7, ignore_eos=True).token_ids
                  for p in PROMPTS]
        out = {"logits": logits, "greedy": greedy, "seeded": seeded}
        if args.batcher:
            out["batcher"] = run_batcher(model)
        return out

    base = outputs(mrs.load(args.model, **options))
    report["scale"] = float(np.abs(base["logits"]).max())
    for tp in args.tp:
        model = mrs.load(args.model, tensor_parallel=tp, **options)
        got = outputs(model)
        compiled = model.runner.steps(0).compiled_count()
        mrs.generate(model, PROMPTS[0], max_tokens=12, temperature=0.5, seed=1, ignore_eos=True)
        steps = model.runner.compiled(0)
        report[str(tp)] = {
            "max_abs_diff": float(np.abs(got["logits"] - base["logits"]).max()),
            "greedy_equal": got["greedy"] == base["greedy"],
            "seeded_equal": got["seeded"] == base["seeded"],
            "batcher_equal": got.get("batcher") == base.get("batcher"),
            "recompiled": model.runner.steps(0).compiled_count() - compiled,
            "leaves": split_leaves(model.runner.params),
            "decode": collectives(next(iter(steps.decode._by_shape.values()))),
            "prefill": collectives(next(iter(steps.prefill._by_shape.values()))),
            "layers": int(model.config.num_hidden_layers),
            "device_name": model.runner.device_name,
        }
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
