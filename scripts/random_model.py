#!/usr/bin/env python
"""Write a Hugging Face model folder with random weights at a real model's shapes.

For benchmarks that need real sizes but no Hub download: the folder holds the real
config.json values of the named model, seeded random safetensors at the requested
dtype (sharded like the Hub checkpoints once they pass SHARD_BYTES), a
generation_config.json, and a trivial word-level tokenizer (``t0 t1 ...``, one token
per id) — enough for mrs and transformers to load it; benches feed token ids anyway.

    python scripts/random_model.py --shape smollm2-135m [--dtype float32] [--out DIR] [--seed 0]

Tensors are generated and written one row-chunk at a time with a streaming
safetensors writer, so even Llama-3.1-8B never needs its full size in host memory.
The folder is built under a temporary name and renamed when complete, so an
interrupted build never looks like a model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The real config.json values (as published on the Hub) of each shape. Only what a
# Llama-family loader reads; the token ids are the base models'.
SHAPES: dict[str, dict] = {
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "rope_scaling": None, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 0,
    },
    "tinyllama-1.1b": {  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "llama-3.1-8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
}

DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
SHARD_BYTES = 5 * 2**30        # the Hub's usual max_shard_size
INIT_STD = 0.02                # transformers' initializer_range for these families
CHUNK_ELEMENTS = 2**24         # rows generated per write: ~64 MB of float32 at a time
Progress = Callable[[int], None]


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names -> shapes for a Llama-family config (HF layout, [out, in])."""
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    N, K = config["num_attention_heads"], config["num_key_value_heads"]
    H = config.get("head_dim") or D // N
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
    shapes["model.norm.weight"] = (D,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def num_params(config: dict) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(config).values())


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes  # a jax dependency; numpy has no bfloat16

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(np.float16 if dtype == "float16" else np.float32)


def _chunks(name: str, shape: tuple[int, ...], dtype: str, seed: int):
    """Yield the tensor's bytes in row chunks; seeded per name, so order never matters."""
    if name.endswith("norm.weight"):
        yield _cast(np.ones(shape, np.float32), dtype).tobytes()
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, cols = shape[0], int(np.prod(shape[1:]))
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = rng.standard_normal((n, cols), dtype=np.float32)
        x *= np.float32(INIT_STD)
        yield _cast(x, dtype).tobytes()


def write_safetensors(file: Path, tensors: dict[str, tuple[int, ...]], dtype: str, seed: int,
                      progress: Progress) -> None:
    """Stream tensors into one safetensors file (8-byte header size, JSON header, raw data)."""
    code, size = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        nbytes = int(np.prod(shape)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors.items():
            for chunk in _chunks(name, shape, dtype, seed):
                f.write(chunk)
                progress(len(chunk))


def write_tokenizer(folder: Path, config: dict) -> None:
    """A word-level tokenizer with one token ``t<id>`` per model id (specials at bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    names = {config["bos_token_id"]: "<s>", config["eos_token_id"]: "</s>"}
    for i, name in names.items():
        del vocab[f"t{i}"]
        vocab[name] = i
    unk = names[config["eos_token_id"]]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[config["bos_token_id"]],
        "eos_token": names[config["eos_token_id"]], "unk_token": unk, "model_max_length":
        config["max_position_embeddings"]}, indent=2))


def make_random_model(shape: str, dtype: str, out: Path, seed: int = 0,
                      progress: Progress | None = None, layers: int | None = None,
                      overrides: dict | None = None) -> Path:
    """Build the folder at ``out`` (via a temp name); returns ``out``. Overwrites nothing.
    ``layers`` changes the shape's depth (its widths stay); ``overrides`` replaces config
    values (widths, head counts) for a smaller or differently split model."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    progress = progress or (lambda n: None)
    config = {**SHAPES[shape], "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
              "initializer_range": INIT_STD}
    config.update(overrides or {})
    if layers is not None:
        config["num_hidden_layers"] = int(layers)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "do_sample": False}, indent=2))
        write_tokenizer(tmp, config)
        shards: list[dict[str, tuple[int, ...]]] = [{}]
        used, size = 0, DTYPES[dtype][1]
        for name, tshape in tensor_shapes(config).items():
            nbytes = int(np.prod(tshape)) * size
            if shards[-1] and used + nbytes > SHARD_BYTES:
                shards.append({})
                used = 0
            shards[-1][name] = tshape
            used += nbytes
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], dtype, seed, progress)
        else:
            weight_map, total = {}, 0
            for i, tensors in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / file, tensors, dtype, seed, progress)
                weight_map.update({name: file for name in tensors})
                total += sum(int(np.prod(s)) * size for s in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "RANDOM_WEIGHTS.json").write_text(json.dumps({"shape": shape, "dtype": dtype, "seed": seed,
                                                             "layers": config["num_hidden_layers"]}))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path, help="folder to create (default: ./<shape>-<dtype>-random)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    out = args.out or Path(f"{args.shape}-{args.dtype}-random")
    total = num_params(SHAPES[args.shape]) * DTYPES[args.dtype][1]
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task(f"writing {out}", total=total)
        make_random_model(args.shape, args.dtype, out, args.seed, lambda n: bar.advance(task, n))
    print(out)


if __name__ == "__main__":
    main()
