#!/usr/bin/env python
"""LoRA training speed: mrs against transformers + PEFT on the same weights and batches.

Each measurement is a fresh process (so peak RSS is its own), alternating mrs and the
peer round by round, since these machines drift. Both train LoRA (r=8, alpha=16) on the
attention and MLP projections with AdamW and gradient clipping, on the same random token
rows (loss on every token), float32, all CPU threads; the first updates (compilation,
allocator warm-up) are not timed.

    python scripts/bench_train.py [--shape smollm2-135m] [--batch 4] [--length 128]
                                  [--steps 10] [--rounds 3] [--quantize int4]

``--quantize`` adds a QLoRA row for mrs (a 4- or 8-bit base); transformers has no CPU
QLoRA to compare with (bitsandbytes' 4-bit layers need a GPU).
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP = 2


def rows(batch: int, length: int, vocab: int, seed: int = 0):
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def worker_mrs(folder: Path, args) -> dict:
    import numpy as np

    import mrs
    from mrs.train import LoraModel, LoraSettings, Trainer, TrainOptions

    model = mrs.load(str(folder), quantize=args.quantize)
    lora = LoraModel(model, LoraSettings(rank=8, alpha=16, targets=tuple(TARGETS)))
    trainer = Trainer(lora, TrainOptions(steps=WARMUP + args.steps, batch_size=args.batch, learning_rate=1e-4))
    tokens, targets = rows(args.batch, args.length, model.vocab_size)
    batch = {"tokens": tokens, "targets": targets, "weights": np.ones(tokens.shape, np.float32),
             "positions": np.tile(np.arange(args.length, dtype=np.int32), (args.batch, 1))}
    for _ in range(WARMUP):
        trainer.step(batch)
    began = time.perf_counter()
    losses = [trainer.step(batch)[0] for _ in range(args.steps)]       # float(): waits for each step
    return {"seconds": time.perf_counter() - began, "loss": losses[-1], "trainable": lora.trainable_count}


def worker_peft(folder: Path, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    tokens, targets = rows(args.batch, args.length, base.config.vocab_size)
    tokens, targets = torch.tensor(tokens, dtype=torch.long), torch.tensor(targets, dtype=torch.long)

    def step() -> float:
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(WARMUP):
        step()
    began = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    return {"seconds": time.perf_counter() - began, "loss": losses[-1], "trainable": sum(p.numel() for p in trainable)}


def measure(which: str, folder: Path, args) -> dict:
    """One fresh process: tokens/s of the timed updates and the process's peak RSS."""
    command = [sys.executable, __file__, "--worker", which, "--folder", str(folder), "--batch", str(args.batch),
               "--length", str(args.length), "--steps", str(args.steps)]
    if which == "mrs-quantized":
        command += ["--quantize", args.quantize]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{which} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_second"] = args.batch * args.length * args.steps / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--model", help="a model folder instead of the random --shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = worker_peft if args.worker == "peft" else worker_mrs
        result = run(args.folder, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import bench

    folder = bench.model_folder(argparse.Namespace(model=args.model, shape=args.shape, dtype="float32", seed=0,
                                                   cache_dir=None))
    kinds = ["mrs", "peft"] + (["mrs-quantized"] if args.quantize else [])
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for round_ in range(args.rounds):
        for which in (kinds if round_ % 2 == 0 else kinds[::-1]):
            results[which].append(measure(which, folder, args))
            r = results[which][-1]
            print(f"round {round_ + 1} {which:14s} {r['tokens_per_second']:8.1f} tok/s  "
                  f"loss {r['loss']:.4f}  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    median = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in results.items()}
    print(f"\n{args.shape}, batch {args.batch} x {args.length} tokens, {args.steps} timed updates, "
          f"{args.rounds} rounds (medians):")
    for which, values in results.items():
        rss = statistics.median(r["peak_rss_mb"] for r in values)
        ratio = median[which] / median["peft"]
        print(f"  {which:14s} {median[which]:8.1f} tok/s  ({ratio:.2f}x transformers+PEFT)  "
              f"peak RSS {rss:.0f} MB  trainable {values[0]['trainable']:,}")


if __name__ == "__main__":
    main()
