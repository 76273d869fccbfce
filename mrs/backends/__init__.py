"""The seam between mrs and an array library.

Everything above it (the model record in mrs/model.py, the generation loop, the
continuous batcher, chat sessions, embeddings, the server, the CLI) sees numpy and the
small protocol below, never jax or mlx. A backend implements it once:

- ``load(path, family, config, dtype, device, **options) -> Runner``: weights of one model
  placed on the backend's device, its compiled steps, its caches; ``quantized=`` (module
  path -> mrs.quant.QuantFormat of tensors that arrive packed) and ``quantize=`` (a format
  for dense projections at load) where the backend runs quantized weights;
- optionally ``TENSOR_PARALLEL = True``, where ``load`` takes ``tensor_parallel=N`` (the model
  split over N devices, mrs/shard.py) and its Runner says ``tensor_parallel``;
- optionally ``join_group(coordinator, num_processes, process_id, ...)``,
  ``share_token(token, timeout)`` and ``holds_device_values(value)``, where one model can
  span several processes (mrs/distributed.py, mrs/mirror.py: the leader mirrors every runner call to the
  others); ``cache_max_len``, ``cache_lengths``, ``rewindable`` and ``compiled_count`` then
  run on the leader alone, so they must launch no device program;
- optionally ``quantized_kernel(device)`` (the kernel's name, or None where quantized
  weights must be dequantized), ``quantized_kernel_reason(device)`` (why not) and
  ``runs_format(fmt)`` (False for formats its kernels lack: mrs.load reads those dense);
- optionally, for fine-tuning (mrs/train), ``lora_model(model, settings, seed=, remat=)``
  (the model with LoRA factors split from its frozen base, ``params``/``loss``/``adapter``)
  and ``lora_trainer(lora, options)`` (``step(batch)``, ``evaluate``, ``save``/``restore``);
- ``Runner``: new caches (opaque pytrees with per-slot lengths), whole-sequence logits,
  pooled encoder states, and ``steps(num_top)``;
- ``Steps``: prefill into a batch or into one cache slot, and decode, each returning a
  ``Pending`` result that the loop reads back one step late (so the host's work on a
  step overlaps the device's work on the next).

Sampling parameters are validated once, backend-free, in mrs/sampling.py; a backend's
``Steps.sampling`` turns the validated rows into its own kernel inputs. The JAX backend
(mrs/backends/jax) is the first implementation; tests plug in a numpy one.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from mrs.errors import MrsError


class Sampled(NamedTuple):
    """A step's sampled tokens, read back to the host."""

    tokens: np.ndarray          # [B] int32
    logprobs: np.ndarray        # [B] float32, of the chosen token under the processed logits
    top_ids: np.ndarray         # [B, num_top] int32, most likely first
    top_logprobs: np.ndarray    # [B, num_top] float32


class Pending(Protocol):
    """A step's result, possibly still being computed on the device."""

    tokens: Any                 # the sampled tokens as the backend holds them (the next decode's input)

    def read(self, top: bool = False) -> Sampled:
        """Wait for the step and bring its result to numpy (top alternatives only when asked)."""


class Steps(Protocol):
    """One model's compiled steps for a given number of top alternatives.

    Array arguments may be numpy or what the backend returned before; ``allowed`` is a
    [B, V] bool numpy mask or None (every token allowed). Shapes are the only things
    that compile: sampling values, steps and masks are data.
    """

    vocab_size: int

    def sampling(self, params: Any) -> Any:
        """Validated ``SamplingParams`` rows -> this backend's kernel inputs."""

    def history(self, history: np.ndarray) -> Any:
        """[B, W] int32 right-aligned recent tokens (-1 = empty) -> the backend's array."""

    def tokens(self, tokens: np.ndarray) -> Any:
        """[B] int32 next tokens -> the backend's array (what ``Pending.tokens`` holds)."""

    def prefill(self, cache: Any, tokens: np.ndarray, positions: np.ndarray, sampling: Any, history: Any,
                step: np.ndarray, allowed: np.ndarray | None) -> tuple[Pending, Any]:
        """Run prompts [B, T] (positions -1 = padding) and sample each row's first token."""

    def prefill_slot(self, width: int, cache: Any) -> Callable[..., tuple[Pending, Any]]:
        """Compile (blocking; callers may use a helper thread) the prefill of one request of
        ``width`` tokens into one slot of caches shaped like ``cache``:
        ``run(cache, tokens [1, T], positions [1, T], slot, sampling (one row), history [1, W],
        step [1], allowed) -> (Pending, cache)``. The row continues the slot's state from its
        first position: 0 starts afresh, k > 0 keeps the k positions the slot holds (a reused
        prefix; a recurrent state only when k is everything it has seen)."""

    def decode(self, cache: Any, tokens: Any, sampling: Any, history: Any, step: np.ndarray, active: np.ndarray,
               allowed: np.ndarray | None) -> tuple[Pending, Any, Any]:
        """Feed each active row's last token [B] at its own position and sample the next;
        returns (pending, cache, history with the tokens pushed). Inactive rows write nothing."""

    def put_row(self, array: Any, slot: int, row: Any) -> Any:
        """``array[slot] = row[0]`` without recompiling per slot (tokens, history)."""

    def compiled_count(self) -> int:
        """How many compilations these steps hold (for no-recompile tests and /metrics)."""


class Runner(Protocol):
    """One loaded model on one backend: its weights, caches and steps."""

    backend: str                # "jax", ...
    device_name: str            # what `mrs ps` shows, e.g. "cpu" or "cuda:0"
    on_accelerator: bool
    dtype_name: str             # "float32", "bfloat16", ...
    num_params: int

    def new_cache(self, slots: int, max_len: int) -> Any:
        """Fresh per-slot state (KV or SSM) for ``slots`` rows of up to ``max_len`` tokens."""

    def cache_max_len(self, cache: Any) -> int:
        """How many positions a cache was planned for."""

    def cache_lengths(self, cache: Any) -> np.ndarray:
        """[slots] int32 positions each slot holds."""

    def with_lengths(self, cache: Any, lengths: np.ndarray) -> Any:
        """The cache with each slot cut back (or forward) to ``lengths`` [slots] positions."""

    def rewindable(self, cache: Any) -> bool:
        """Whether a slot can be cut back to an earlier position (KV yes; recurrent state no)."""

    def steps(self, num_top: int = 0) -> Steps:
        """The compiled steps (shared by every caller of this model)."""

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """All-position logits [B, T, V] float32 of tokens [B, T] from a fresh cache."""

    def embed(self, tokens: np.ndarray, mask: np.ndarray, pooling: Any) -> np.ndarray:
        """Encoder states of tokens, mask [B, T] pooled as ``pooling`` says -> [B, dim] float32."""

    def compiled_count(self) -> int:
        """Compilations held outside ``steps`` (embedding shapes)."""


# Backend name -> the module whose ``load(path, family, config, *, dtype, device, **options)``
# returns a Runner; imported on first use, so `mrs --help` never imports an array library.
BACKENDS: dict[str, str] = {"jax": "mrs.backends.jax", "mlx": "mrs.backends.mlx"}
# What to install when a backend's array library is missing.
EXTRAS: dict[str, str] = {"jax": "pip install mrs (jax is a core dependency)",
                          "mlx": 'pip install "mrs[mlx]" (mlx on macOS, mlx[cpu] on Linux)'}
_LOADED: dict[str, Any] = {}


def backend(name: str) -> Any:
    """The backend module of that name (a clear error when its array library is missing)."""
    if name not in _LOADED:
        if name not in BACKENDS:
            raise MrsError(f"backend {name!r} is not available (have: {', '.join(sorted(BACKENDS))})")
        try:
            _LOADED[name] = importlib.import_module(BACKENDS[name])
        except ImportError as e:
            library = (e.name or "").split(".")[0]
            if library not in ("mlx", "jax", "jaxlib", "flax"):
                raise
            raise MrsError(f"the {name} backend needs {library}, which is not installed here: "
                           f"{EXTRAS.get(name, 'install it')}") from e
    return _LOADED[name]


def apple_silicon() -> bool:
    """macOS on arm64, where MLX runs on the GPU."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def auto_backend() -> str:
    """What ``--device auto`` runs: MLX on Apple silicon when mlx is installed, else JAX."""
    if apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "jax"


def for_device(device: str | None) -> Any:
    """The backend that runs ``device``: 'mlx', else JAX ('cpu', 'gpu', 'tpu'); 'auto' as
    ``auto_backend`` says."""
    device = device or "auto"
    if device == "auto":
        return backend(auto_backend())
    if device in BACKENDS:
        return backend(device)
    return backend("jax")
