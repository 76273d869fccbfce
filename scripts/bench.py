#!/usr/bin/env python
"""Prefill and decode throughput of mrs against transformers on the same weights.

    python scripts/bench.py --shape smollm2-135m --dtype float32 --batch 1 8
    python scripts/bench.py --model ~/models/org--name --json out.json

For a model folder (``--model``) or a random-weight folder at a real model's shapes
(``--shape``, built once by scripts/random_model.py and cached), this runs the same
prompt token ids (``--prompt-len`` random ids per row, seeded) through

* mrs: ``mrs.generate_batch`` greedy with ``ignore_eos``, after a warm-up run of the
  same shapes that compiles prefill and decode (the compile count is checked to stay
  put, so no timed run pays for compiling). Prefill is ``Completion.prompt_seconds``;
  decode is ``Completion.decode_seconds``. A second, raw measurement loops the
  jitted ``model.runner.compiled().decode`` with no host reads in between, so the gap between the
  two is the generation loop's host overhead.
* transformers: ``AutoModelForCausalLM.from_pretrained`` under ``torch.inference_mode``,
  prefill as one forward over the prompt (``logits_to_keep=1``, as generate does),
  decode from greedy ``generate(min_new_tokens=max_new_tokens)`` timed per token with a
  streamer, from the first new token to the last.

Both models are loaded side by side, and the timed runs alternate: each of the
``--repeats`` rounds times one mrs run, then one transformers run, at the same batch
size. A shared machine's bandwidth drifts from minute to minute; alternating puts both
frameworks in the same minutes instead of one after the other.

Decode tokens/s counts the ``new_tokens - 1`` tokens made by decode steps (the first
comes out of prefill): ``batch * (new_tokens - 1) / decode seconds``; the median of
``--repeats`` runs is reported (``--stat best``: the fastest, steadier on a shared machine;
the JSON keeps every run's seconds and the machine's load average). The memory-bandwidth bound of a decode step reads
every weight once (the input embedding only as a gather, unless tied as the output
head): ``batch * copy_bandwidth / weight_bytes`` tokens/s, with copy bandwidth
measured in this run as the best of a numpy copy (one and all threads) and a jitted
jax copy on the default device (bytes read + written, as STREAM counts them). The
KV-cache reads are left out of the bound and reported beside it. A decode step only
reads its weights, so the report also gives each framework's weight stream as a share
of the measured read bandwidth (a jitted jax sum and a threaded numpy sum), the ceiling
a step can actually reach; on CPUs it is well below the copy figure.

Runs without mrs pip-installed (the repo root goes on sys.path) and without torch
(transformers is skipped with a note).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

try:
    import mrs
except ImportError:  # a checkout without `pip install -e .` (e.g. a fresh GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mrs

try:
    import random_model  # scripts/ is on sys.path when this file runs as a script
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import random_model

console = Console(stderr=True)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --- the machine -------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    device = jax.devices()[0]
    info = {
        "cpu": cpu_model(), "cores": cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "device": str(device), "device_kind": device.device_kind, "device_count": jax.device_count(),
    }
    try:
        import mlx.core as mx

        info["mlx"], info["mlx_device"] = mx.__version__, str(mx.default_device())
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> dict:
    """GB/s (1e9 bytes/s, read + write) of a large copy: numpy (1 and all threads) and jax."""
    out: dict[str, Any] = {"array_bytes": nbytes}
    if jax.default_backend() == "cpu":
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        out["numpy_gbps"] = 2 * nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9
        threads = cpu_count()
        parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads), strict=True))
        with ThreadPoolExecutor(threads) as pool:  # np.copyto releases the GIL
            def threaded():
                list(pool.map(lambda p: np.copyto(*p), parts))
            out["numpy_threads_gbps"] = 2 * nbytes / _best_seconds(threaded, repeats) / 1e9
    # In place (donated), so the time is the copy's and not the OS's zeroing of a fresh
    # output buffer; a + 1 cannot be folded into an alias as a plain copy could.
    add = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    box = [jnp.ones((nbytes // 4,), jnp.float32)]

    def jax_copy():  # several dispatches per timing, so dispatch latency is amortized
        for _ in range(8):
            box[0] = add(box[0])
        box[0].block_until_ready()

    out["jax_gbps"] = 8 * 2 * nbytes / _best_seconds(jax_copy, repeats) / 1e9
    return _with_best(out)


def _with_best(rates: dict) -> dict:
    """Add ``gbps``: the best of the ``*_gbps`` measurements."""
    return rates | {"gbps": max(v for k, v in rates.items() if k.endswith("_gbps"))}


def _best_of(rates: dict) -> str:
    """"12.3 GB/s (best of jax 12.3, numpy 10.1)" for a bandwidth dict."""
    parts = ", ".join(f"{k.removesuffix('_gbps')} {v:.1f}" for k, v in rates.items()
                      if k.endswith("_gbps") and k != "gbps")
    return f"{rates['gbps']:.1f} GB/s (best of {parts})"


def _jax_read_gbps(nbytes: int, repeats: int) -> float:
    """The jax half of read_bandwidth; its array is freed on return, before numpy's is made."""
    total = jax.jit(jnp.sum)
    data = jnp.ones((nbytes // 4,), jnp.float32)

    def jax_read():
        for _ in range(8):
            result = total(data)
        result.block_until_ready()

    return 8 * nbytes / _best_seconds(jax_read, repeats) / 1e9


def read_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> dict:
    """GB/s of reading a large array without writing one (a sum), jax and numpy on all
    threads: a decode step streams its weights this way, so this is its real ceiling
    (the copy bound above counts written bytes too)."""
    out: dict[str, Any] = {"array_bytes": nbytes, "jax_gbps": _jax_read_gbps(nbytes, repeats)}
    if jax.default_backend() == "cpu":
        parts = np.array_split(np.ones(nbytes // 4, np.float32), cpu_count())
        with ThreadPoolExecutor(len(parts)) as pool:  # numpy's sum releases the GIL
            out["numpy_threads_gbps"] = nbytes / _best_seconds(lambda: list(pool.map(np.sum, parts)), repeats) / 1e9
    return _with_best(out)


# --- the model folder --------------------------------------------------------------

def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mrs-bench"


def model_folder(args) -> Path:
    """The folder to bench: --model as given, or the cached random folder for --shape."""
    if args.model:
        return Path(args.model).expanduser()
    folder = Path(args.cache_dir or default_cache_dir()) / f"{args.shape}-{args.dtype}-seed{args.seed}"
    if (folder / "config.json").is_file():
        console.log(f"using cached random weights in {folder}")
        return folder
    config = random_model.SHAPES[args.shape]
    total = random_model.num_params(config) * random_model.DTYPES[args.dtype][1]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"writing random {args.shape} ({args.dtype})", total=total)
        random_model.make_random_model(args.shape, args.dtype, folder, args.seed, lambda n: bar.advance(task, n))
    console.log(f"wrote random weights to {folder}")
    return folder


@contextmanager
def mrs_load_progress(folder: Path):
    """Show a byte progress bar while mrs reads the checkpoint (wraps mrs.weights.iter_tensors)."""
    from mrs import weights

    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    original = getattr(weights, "iter_tensors", None)
    if original is None:  # the loader changed shape: load without a bar rather than fail
        yield
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("mrs: loading weights", total=total)

        def iter_tensors(path):
            for name, array in original(path):
                yield name, array
                bar.advance(task, array.nbytes)

        weights.iter_tensors = iter_tensors
        try:
            yield
        finally:
            weights.iter_tensors = original


def named_params(model) -> list[tuple[str, Any]]:
    """(dotted name, array) of every param, on either backend."""
    if model.runner.backend == "mlx":
        from mlx.utils import tree_flatten

        return tree_flatten(model.runner.model.parameters())
    return [(".".join(str(getattr(key, "key", key)) for key in path), value)
            for path, value in jax.tree_util.tree_flatten_with_path(model.runner.params)[0]]


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of params a decode step reads, bytes of all params)."""
    total = read = 0
    tied = model.hf_config.get("tie_word_embeddings", False)
    for name, value in named_params(model):
        nbytes = value.nbytes
        total += nbytes
        if not (name.endswith("embed_tokens.weight") and not tied):  # a gather, unless it is the head
            read += nbytes
    return read, total


def kv_bytes_per_step(config, batch: int, max_len: int, dtype: str) -> int:
    """Bytes of K and V a decode step reads when it attends over the whole cache bucket."""
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    return 2 * layers * batch * kv_heads * max_len * head_dim * BYTES[dtype]


# --- mrs ---------------------------------------------------------------------------

STAT = "median"  # or "best" (--stat): which of the timed runs a rate is computed from


def typical(values: list[float]) -> float:
    """The median (or, with --stat best, the shortest) of the timed runs' seconds."""
    if not values:
        return float("nan")
    return min(values) if STAT == "best" else statistics.median(values)


def mrs_raw_steps(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s for new_tokens - 1 steps) of the jitted steps alone, no host reads."""
    from mrs.engine.shapes import MIN_CACHE_BUCKET, MIN_PROMPT_BUCKET, bucket, step_positions
    from mrs.sampling import SamplingParams

    if model.runner.backend != "jax":
        return protocol_raw_steps(model, prompts, new_tokens)
    batch, length = prompts.shape
    max_len = bucket(length + new_tokens, MIN_CACHE_BUCKET, model.context_length)
    width = bucket(length, MIN_PROMPT_BUCKET, max_len)
    tokens = np.zeros((batch, width), np.int32)
    tokens[:, :length] = prompts
    history = np.full((batch, max_len), -1, np.int32)
    history[:, max_len - length:] = prompts
    sampling = SamplingParams.stack([SamplingParams.make(temperature=0, seed=0) for _ in range(batch)])
    cache = model.init_cache(batch, max_len)
    positions = jnp.asarray(step_positions(np.zeros((batch,), np.int32), np.full((batch,), length, np.int32), width))
    step = jnp.zeros((batch,), jnp.int32)
    tokens, history = jnp.asarray(tokens), jnp.asarray(history)
    sampling = jax.tree.map(jnp.asarray, sampling)
    jax.block_until_ready((cache, positions, tokens, history, sampling))
    steps, params = model.runner.compiled(0), model.runner.params   # the raw jitted functions
    allowed, active = steps.all_allowed(batch), np.ones((batch,), bool)
    started = time.perf_counter()
    result, cache = steps.prefill(params, tokens, positions, cache, sampling, history, step, allowed)
    result.tokens.block_until_ready()
    prefilled = time.perf_counter()
    for _ in range(new_tokens - 1):
        step = step + 1
        result, cache, history = steps.decode(params, result.tokens, cache, sampling, history, step, active,
                                              allowed)
    result.tokens.block_until_ready()
    return prefilled - started, time.perf_counter() - prefilled


def protocol_raw_steps(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """``mrs_raw_steps`` through the backend protocol (MLX): prefill, then decode steps fed
    each other's pending tokens, read back only at the end."""
    from mrs.engine.shapes import MIN_CACHE_BUCKET, MIN_PROMPT_BUCKET, bucket, step_positions
    from mrs.sampling import SamplingParams

    batch, length = prompts.shape
    max_len = bucket(length + new_tokens, MIN_CACHE_BUCKET, model.context_length)
    width = bucket(length, MIN_PROMPT_BUCKET, max_len)
    tokens = np.zeros((batch, width), np.int32)
    tokens[:, :length] = prompts
    history = np.full((batch, max_len), -1, np.int32)
    history[:, max_len - length:] = prompts
    steps = model.runner.steps(0)
    sampling = steps.sampling(SamplingParams.stack([SamplingParams.make(temperature=0, seed=0)] * batch))
    cache = model.init_cache(batch, max_len)
    positions = step_positions(np.zeros((batch,), np.int32), np.full((batch,), length, np.int32), width)
    history, active = steps.history(history), np.ones((batch,), bool)
    started = time.perf_counter()
    pending, cache = steps.prefill(cache, tokens, positions, sampling, history, np.zeros((batch,), np.int32), None)
    pending.read()
    prefilled = time.perf_counter()
    for i in range(1, new_tokens):
        pending, cache, history = steps.decode(cache, pending.tokens, sampling, history,
                                               np.full((batch,), i, np.int32), active, None)
    pending.read()
    return prefilled - started, time.perf_counter() - prefilled


class MrsBatch:
    """The timed runs of mrs at one batch size: warm() once, then once() per round."""

    def __init__(self, model, prompts: np.ndarray, new_tokens: int):
        self.model, self.prompts, self.new_tokens = model, prompts, new_tokens
        self.rows = [list(map(int, row)) for row in prompts]
        self.runs: list[tuple[float, float, float, float, float | None]] = []
        self.token_ids: list[int] = []

    def _generate(self) -> tuple[float, float, list[int]]:
        done = mrs.generate_batch(self.model, self.rows, max_tokens=self.new_tokens, ignore_eos=True, temperature=0)
        assert all(c.completion_tokens == self.new_tokens for c in done), "mrs stopped early despite ignore_eos"
        return done[0].prompt_seconds, done[0].decode_seconds, done[0].token_ids

    def warm(self) -> None:
        steps = self.model.steps
        self.compiles_before = steps.compiled_count()
        t = time.perf_counter()
        self.warm_prefill, self.warm_decode, _ = self._generate()
        self.warmup_seconds = time.perf_counter() - t
        mrs_raw_steps(self.model, self.prompts, self.new_tokens)  # compiles nothing new; warms the raw path
        self.compiles_warm = steps.compiled_count()

    def once(self) -> None:
        p, d, self.token_ids = self._generate()
        load = load_average()
        rp, rd = mrs_raw_steps(self.model, self.prompts, self.new_tokens)
        self.runs.append((p, d, rp, rd, load))

    def result(self) -> dict:
        batch, new_tokens = self.prompts.shape[0], self.new_tokens
        recompiles = self.model.steps.compiled_count() - self.compiles_warm
        if recompiles:
            console.log(f"[red]mrs recompiled {recompiles} time(s) during timed runs: timings include compiles")
        prefill, decode, raw_prefill, raw_decode, loads = (list(x) for x in zip(*self.runs, strict=True))
        decode_steps = new_tokens - 1
        return {
            "prefill_tok_s": batch * self.prompts.shape[1] / typical(prefill),
            "decode_tok_s": batch * decode_steps / typical(decode),
            "decode_step_ms": 1e3 * typical(decode) / decode_steps,
            "raw_prefill_tok_s": batch * self.prompts.shape[1] / typical(raw_prefill),
            "raw_decode_tok_s": batch * decode_steps / typical(raw_decode),
            "raw_decode_step_ms": 1e3 * typical(raw_decode) / decode_steps,
            "prefill_seconds": prefill, "decode_seconds": decode,
            "raw_prefill_seconds": raw_prefill, "raw_decode_seconds": raw_decode,
            "warmup": {"seconds": self.warmup_seconds, "prefill_seconds": self.warm_prefill,
                       "decode_seconds": self.warm_decode},
            "compilations": {"warmup": self.compiles_warm - self.compiles_before, "timed": recompiles},
            "loadavg_per_run": loads, "tokens_row0": self.token_ids,
        }


def load_mrs(folder: Path, args) -> tuple[Any, dict]:
    with mrs_load_progress(folder):
        t = time.perf_counter()
        model = mrs.load(folder, dtype=args.dtype, device=args.device, home=folder.parent, quantize=args.quantize)
        if model.runner.backend == "jax":
            jax.block_until_ready(model.runner.params)          # (MLX evaluates its weights at load)
        wall = time.perf_counter() - t
    console.log(f"mrs: loaded {model} in {model.load_seconds:.2f}s ({wall:.2f}s until on device)")
    read, total = weight_bytes(model)
    return model, {"backend": model.runner.backend, "device": model.runner.device_name,
                   "load_seconds": model.load_seconds, "load_wall_seconds": wall, "num_params": model.num_params,
                   "param_bytes": total, "weight_bytes_per_step": read, "by_batch": {},
                   "quantization": model.quantization, "execution": model.runner.formats and "quantized" or "dense"}


# --- transformers ------------------------------------------------------------------

def transformers_unavailable() -> str | None:
    """Why transformers cannot run here comparably, or None."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name or 'torch/transformers'} is not installed"
    if jax.default_backend() == "gpu" and not torch.cuda.is_available():
        return "torch has no CUDA here, and transformers on the CPU is no comparison for a GPU"
    return None


class _Clock:
    """A generate() streamer that only stamps times: the prompt, then each new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def _torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def hf_prefill_seconds(model, ids, device: str) -> float:
    """One forward over the prompt, keeping only the last logits as generate's prefill does."""
    import torch

    with torch.inference_mode():
        _torch_sync(device)
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        _torch_sync(device)
        return time.perf_counter() - t


def hf_generate_seconds(model, ids, new: int, pad: int, device: str) -> tuple[float, float, list[int]]:
    """(start to first new token s, first to last new token s, row 0's new tokens) of greedy generate."""
    import torch

    clock = _Clock()
    with torch.inference_mode():
        _torch_sync(device)
        t = time.perf_counter()
        result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=pad, streamer=clock)
        _torch_sync(device)
        end = time.perf_counter()
    assert result.shape[1] == ids.shape[1] + new, "transformers stopped early"
    first = clock.stamps[1]  # [0] is the prompt, [1] the first new token
    return first - t, end - first, result[0, ids.shape[1]:].tolist()


def load_transformers(folder: Path, args) -> tuple[Any, dict]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cpu_count())
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    console.log("transformers: loading weights")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    _torch_sync(device)
    load_seconds = time.perf_counter() - t
    console.log(f"transformers: loaded in {load_seconds:.2f}s")
    return model, {"load_seconds": load_seconds, "version": transformers.__version__, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "device": device, "by_batch": {}}


class TransformersBatch:
    """The timed runs of transformers at one batch size: warm() once, then once() per round."""

    def __init__(self, model, device: str, prompts: np.ndarray, new_tokens: int):
        import torch

        eos = model.generation_config.eos_token_id
        self.pad = (eos[0] if isinstance(eos, list) else eos) or 0
        self.model, self.device, self.new_tokens, self.prompts = model, device, new_tokens, prompts
        self.ids = torch.tensor(prompts, dtype=torch.long, device=device)
        self.runs: list[tuple[float, float, float, float | None]] = []
        self.tokens: list[int] = []

    def warm(self) -> None:
        t = time.perf_counter()
        hf_prefill_seconds(self.model, self.ids, self.device)
        hf_generate_seconds(self.model, self.ids, self.new_tokens, self.pad, self.device)
        self.warmup = time.perf_counter() - t

    def once(self) -> None:
        prefill = hf_prefill_seconds(self.model, self.ids, self.device)
        load = load_average()
        p, d, self.tokens = hf_generate_seconds(self.model, self.ids, self.new_tokens, self.pad, self.device)
        self.runs.append((prefill, p, d, load))

    def result(self) -> dict:
        batch, new = self.prompts.shape[0], self.new_tokens
        prefills, gen_prefills, decodes, loads = (list(x) for x in zip(*self.runs, strict=True))
        return {
            "prefill_tok_s": batch * self.prompts.shape[1] / typical(prefills),
            "decode_tok_s": batch * (new - 1) / typical(decodes),
            "decode_step_ms": 1e3 * typical(decodes) / (new - 1),
            "generate_prefill_tok_s": batch * self.prompts.shape[1] / typical(gen_prefills),
            "prefill_seconds": prefills, "generate_prefill_seconds": gen_prefills, "decode_seconds": decodes,
            "warmup_seconds": self.warmup, "loadavg_per_run": loads, "tokens_row0": self.tokens,
        }


def run_rounds(folder: Path, args, batches: list[int], prompts: np.ndarray, with_transformers: bool) -> tuple:
    """Both frameworks loaded side by side; per batch size, each round times one mrs run
    then one transformers run, so a slow spell of a shared machine hits both alike."""
    model, ours = load_mrs(folder, args)
    theirs = hf = None
    if with_transformers:
        hf, theirs = load_transformers(folder, args)
    from mrs.engine.shapes import MIN_CACHE_BUCKET, bucket

    max_len = bucket(args.prompt_len + args.new_tokens, MIN_CACHE_BUCKET, model.context_length)
    for batch in batches:
        runners = [MrsBatch(model, prompts[:batch], args.new_tokens)]
        if hf is not None:
            runners.append(TransformersBatch(hf, theirs["device"], prompts[:batch], args.new_tokens))
        for runner in runners:
            runner.warm()
        for i in range(args.repeats):
            console.log(f"batch {batch}: round {i + 1}/{args.repeats}")
            for runner in runners:
                runner.once()
        ours["by_batch"][batch] = runners[0].result() | {
            "cache_len": max_len, "kv_bytes_per_step": kv_bytes_per_step(model.config, batch, max_len, args.dtype)}
        if hf is not None:
            theirs["by_batch"][batch] = runners[1].result()
    del model, hf
    gc.collect()
    return ours, theirs


# --- report ------------------------------------------------------------------------

def agree_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def summarize(report: dict) -> list[dict]:
    rows = []
    ours, theirs = report["mrs"], report.get("transformers")
    read = ours["weight_bytes_per_step"]
    gbps = report["bandwidth"]["gbps"]
    reads = report["read_bandwidth"]["gbps"]
    for batch, m in ours["by_batch"].items():
        h = theirs["by_batch"][batch] if theirs else None
        bound = int(batch) * gbps * 1e9 / read
        read_bound = int(batch) * reads * 1e9 / read
        row = {
            "batch": int(batch), "bound_tok_s": bound,
            "mrs_prefill_tok_s": m["prefill_tok_s"], "mrs_decode_tok_s": m["decode_tok_s"],
            "mrs_raw_decode_tok_s": m["raw_decode_tok_s"], "mrs_pct_bound": 100 * m["decode_tok_s"] / bound,
            "mrs_raw_pct_bound": 100 * m["raw_decode_tok_s"] / bound,
            "mrs_pct_read": 100 * m["decode_tok_s"] / read_bound,
            "kv_bytes_per_step": m["kv_bytes_per_step"],
        }
        if h:
            row.update({
                "hf_prefill_tok_s": h["prefill_tok_s"], "hf_decode_tok_s": h["decode_tok_s"],
                "hf_pct_bound": 100 * h["decode_tok_s"] / bound,
                "hf_pct_read": 100 * h["decode_tok_s"] / read_bound,
                "prefill_ratio": m["prefill_tok_s"] / h["prefill_tok_s"],
                "decode_ratio": m["decode_tok_s"] / h["decode_tok_s"],
                "greedy_agree_tokens": agree_prefix(m["tokens_row0"], h["tokens_row0"]),
            })
        rows.append(row)
    return rows


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def print_table(report: dict) -> None:
    out = Console() if sys.stdout.isatty() else Console(width=160)
    mach, model, bw = report["machine"], report["model"], report["bandwidth"]
    theirs = report.get("transformers")
    out.print(f"[bold]machine[/] {mach['cpu']}, {mach['cores']} cores, {mach.get('memory_gib', '?')} GiB; "
              f"jax {mach['jax']} {mach['jax_backend']} ({mach['device_kind']}); "
              f"load average {mach.get('loadavg', ['?'])[0]} at start, {mach.get('loadavg_end', ['?'])[0]} at end")
    quantized = ", ".join(f"{k} x{v}" for k, v in report["mrs"].get("quantization", {}).items())
    out.print(f"[bold]model[/] {model['name']} {model['dtype']}{' mrs quantized ' + quantized if quantized else ''}: "
              f"{report['mrs']['num_params'] / 1e6:,.1f}M params, "
              f"{report['mrs']['weight_bytes_per_step'] / 1e6:,.0f} MB read per decode step; "
              f"prompt {report['settings']['prompt_len']} + {report['settings']['new_tokens']} new tokens")
    out.print(f"[bold]copy bandwidth[/] {_best_of(bw)}")
    out.print(f"[bold]read bandwidth[/] {_best_of(report['read_bandwidth'])}")
    load = f"mrs on {report['mrs']['backend']} ({report['mrs']['device']}) {report['mrs']['load_seconds']:.2f}s (on device {report['mrs']['load_wall_seconds']:.2f}s)"
    if theirs:
        load += f", transformers {theirs['load_seconds']:.2f}s (torch {theirs['torch']}, {theirs['threads']} threads)"
    else:
        load += f", transformers skipped: {report.get('transformers_skipped')}"
    out.print(f"[bold]load[/] {load}")
    firsts = ", ".join(f"batch {b}: {m['warmup']['seconds']:.1f}s" for b, m in report["mrs"]["by_batch"].items())
    out.print(f"[bold]mrs first run[/] (compiles prefill + decode, then generates) {firsts}")
    table = Table(title=f"tokens/s, {STAT} of {report['settings']['repeats']} runs "
                        "(decode bound = batch × copy bandwidth / weight bytes per step)")
    for name in ("batch", "prefill mrs", "prefill HF", "×", "decode mrs", "decode HF", "×", "bound",
                 "mrs %bound", "HF %bound", "mrs raw steps", "%bound"):
        table.add_column(name, justify="right")
    for r in report["summary"]:
        table.add_row(
            str(r["batch"]), _f(r["mrs_prefill_tok_s"]), _f(r.get("hf_prefill_tok_s")),
            _f(r.get("prefill_ratio"), 2), _f(r["mrs_decode_tok_s"]), _f(r.get("hf_decode_tok_s")),
            _f(r.get("decode_ratio"), 2), _f(r["bound_tok_s"]), _f(r["mrs_pct_bound"]) + "%",
            _f(r.get("hf_pct_bound")) + ("%" if "hf_pct_bound" in r else ""),
            _f(r["mrs_raw_decode_tok_s"]), _f(r["mrs_raw_pct_bound"]) + "%")
    out.print(table)
    for r in report["summary"]:
        hf = f", transformers {r['hf_pct_read']:.0f}%" if "hf_pct_read" in r else ""
        out.print(f"batch {r['batch']}: decode streams the weights at {r['mrs_pct_read']:.0f}% of the read "
                  f"bandwidth (mrs){hf}")
    busiest = max([*mach.get("loadavg", [0])[:1], *mach.get("loadavg_end", [0])[:1]])
    if busiest > 0.5 * mach["cores"]:
        out.print(f"[yellow]warning: load average reached {busiest} on {mach['cores']} cores: other processes "
                  "shared the CPU, so these timings are noisy (transformers' OpenMP threads suffer most when a "
                  "core is taken); rerun on an idle machine or with --stat best")


# --- main --------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a Hugging Face model folder")
    which.add_argument("--shape", choices=sorted(random_model.SHAPES),
                       help="random weights at this model's real shapes (built once, cached)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu", "mlx"],
                        help="where mrs runs (mlx: the MLX backend; transformers stays on the CPU or CUDA)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="run mrs quantized at load (transformers stays dense)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8, and 32 on a GPU)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    parser.add_argument("--stat", choices=["median", "best"], default="median",
                        help="rate from the median run, or from the fastest (steadier on a busy machine)")
    parser.add_argument("--no-transformers", action="store_true", help="bench mrs only")
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--cache-dir", type=Path, help=f"where --shape folders live (default {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt ids")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        parser.error("need --new-tokens >= 2, --prompt-len >= 1 and --repeats >= 1")
    return args


def main(argv=None) -> None:
    global STAT
    # Before jax starts a backend (lazily, on first use): on a GPU, leave room for
    # transformers after mrs instead of jax grabbing 75% of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bench never downloads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    STAT = args.stat
    batches = args.batch or ([1, 8, 32] if jax.default_backend() == "gpu" else [1, 8])
    report: dict[str, Any] = {"machine": machine_info()}
    console.log(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
                f"jax {report['machine']['jax_backend']} ({report['machine']['device_kind']})")
    folder = model_folder(args)
    config = json.loads((folder / "config.json").read_text())
    report["model"] = {"name": args.shape or folder.name, "path": str(folder), "dtype": args.dtype,
                       "random_weights": (folder / "RANDOM_WEIGHTS.json").is_file(), "config": config}
    report["settings"] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                          "batches": batches, "seed": args.seed, "stat": args.stat,
                          "decode_tokens_counted": args.new_tokens - 1}
    console.log("measuring copy bandwidth")
    report["bandwidth"] = copy_bandwidth()
    report["read_bandwidth"] = read_bandwidth()
    vocab = int(config["vocab_size"])
    prompts = np.random.default_rng(args.seed).integers(3, vocab, (max(batches), args.prompt_len), dtype=np.int32)
    skipped = "--no-transformers" if args.no_transformers else transformers_unavailable()
    if skipped:
        report["transformers_skipped"] = skipped
        console.log(f"transformers skipped: {skipped}")
    report["mrs"], theirs = run_rounds(folder, args, batches, prompts, with_transformers=not skipped)
    if theirs is not None:
        report["transformers"] = theirs
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = summarize(report)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        console.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
