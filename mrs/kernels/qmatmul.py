"""Matmul with quantized weights (mrs/quant.py's format): the CPU kernel, its reference,
and the dispatch the quantized layers call.

``qmatmul(x, weight, scales, biases, bits=, kernel=)`` is x [..., K] . W^T -> [..., N].

- ``kernel="cpu"``: mrs's C++ kernel (cpu/qmatmul.cc) through ``jax.ffi``. XLA's CPU
  backend expands a converted int8 weight into a full float32 matrix on every call
  (10-50x slower than the float32 dot); this reads the packed codes where they lie.
- ``kernel="xla"``: ``qmatmul_reference``, dequantize then dot, in jnp: on GPU and TPU
  XLA fuses the dequantization into the matmul's operand read.

The C++ source is compiled on first use (not by the package build, so a pure-Python
wheel works everywhere and ``-march=native`` fits the machine it runs on), with the
system's C++ compiler, into ``~/.cache/mrs/kernels/<hash of source, compiler, CPU
flags, jaxlib>``; the library is built in a temporary name and renamed into place, so
concurrent first uses never load half a file. With no compiler, ``cpu_kernel_error()``
says why once and the loaders dequantize instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "cpu" / "qmatmul.cc"
TARGET = "mrs_qmatmul"
KERNELS = ("cpu", "xla")


# --- reference ---------------------------------------------------------------------------

def unpack_codes(weight: jax.Array, bits: int) -> jax.Array:
    """uint32 [..., K * bits / 32] -> int32 codes [..., K] (each row a little-endian bit stream)."""
    if bits in (4, 8):
        shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
        codes = (weight[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
        return codes.reshape(weight.shape[:-1] + (-1,)).astype(jnp.int32)
    k = weight.shape[-1] * 32 // bits
    start = np.arange(k) * bits                        # each code's first bit
    word, offset = start // 32, (start % 32).astype(np.uint32)
    low = jnp.take(weight, jnp.asarray(word), axis=-1) >> jnp.asarray(offset)
    # a code that crosses a word boundary takes its top bits from the next word
    nxt = jnp.take(weight, jnp.asarray(np.minimum(word + 1, weight.shape[-1] - 1)), axis=-1)
    spill = np.where(offset + bits > 32, 32 - offset, 0).astype(np.uint32)
    high = jnp.where(jnp.asarray(spill > 0), nxt << jnp.asarray(spill), jnp.uint32(0))
    return ((low | high) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)


def dequantize(weight: jax.Array, scales: jax.Array, biases: jax.Array, bits: int,
               dtype=jnp.float32) -> jax.Array:
    """Packed [..., N, *] -> [..., N, K] in ``dtype``."""
    codes = unpack_codes(weight, bits)
    groups = scales.shape[-1]
    k = codes.shape[-1]
    grouped = codes.reshape(codes.shape[:-1] + (groups, k // groups)).astype(jnp.float32)
    w = grouped * scales[..., None].astype(jnp.float32) + biases[..., None].astype(jnp.float32)
    return w.reshape(codes.shape).astype(dtype)


def qmatmul_reference(x: jax.Array, weight: jax.Array, scales: jax.Array, biases: jax.Array, bits: int) -> jax.Array:
    """x [..., K] . dequantize(W)^T: the definition the kernel is held to."""
    w = dequantize(weight, scales, biases, bits, x.dtype)
    return jnp.einsum("...k,nk->...n", x, w)


# --- the CPU kernel ------------------------------------------------------------------------

def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("MRS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mrs", "kernels")
    return Path(base)


def _flags() -> list[str]:
    arch = ["-mcpu=native"] if platform.machine() in ("arm64", "aarch64") else ["-march=native"]
    return ["-O3", *arch, "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded kernel library, None) or (None, why it is not there)."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C++ compiler {compiler} does not run: {e}"
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, _cpu_flags(), " ".join(_flags()),
                                    jax.__version__, include]).encode()).hexdigest()[:16]
    folder = _cache_dir() / key
    library = folder / "libmrs_qmatmul.so"
    if not library.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / library.name
            command = [compiler, *_flags(), f"-I{include}", str(SOURCE), "-o", str(built)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                return None, f"compiling the quantized-matmul kernel failed: {e}"
            if done.returncode != 0:
                return None, f"compiling the quantized-matmul kernel failed: {done.stderr.strip()[-2000:]}"
            os.replace(built, library)
    try:
        return ctypes.cdll.LoadLibrary(str(library)), None
    except OSError as e:
        return None, f"loading the quantized-matmul kernel failed: {e}"


@lru_cache(maxsize=1)
def cpu_kernel_error() -> str | None:
    """None when the CPU kernel is built and registered; else why not (logged once)."""
    lib, why = _library()
    if lib is None:
        log.warning("quantized weights will be dequantized on the CPU: %s", why)
        return why
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MrsQMatmul), platform="cpu")
    return None


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def qmatmul_cpu(x: jax.Array, weight: jax.Array, scales: jax.Array, biases: jax.Array, bits: int) -> jax.Array:
    """The C++ kernel: x [..., K] in float32 (others are cast) -> [..., N] in x's dtype.
    Differentiable in x (QLoRA trains through it); the weights are constants."""
    return _qmatmul_cpu(x, weight, scales, biases, bits)


def _qmatmul_cpu_forward(x, weight, scales, biases, bits):
    return _qmatmul_cpu(x, weight, scales, biases, bits), (weight, scales, biases)


def _qmatmul_cpu_backward(bits, saved, grad):
    """dL/dx = grad . dequantize(W): the backward pass is a dense GEMM over the training
    batch's rows, where dequantizing once per step costs little."""
    weight, scales, biases = saved
    dx = jnp.einsum("...n,nk->...k", grad, dequantize(weight, scales, biases, bits, grad.dtype))
    return dx, np.zeros(weight.shape, jax.dtypes.float0), jnp.zeros_like(scales), jnp.zeros_like(biases)


qmatmul_cpu.defvjp(_qmatmul_cpu_forward, _qmatmul_cpu_backward)


def _qmatmul_cpu(x: jax.Array, weight: jax.Array, scales: jax.Array, biases: jax.Array, bits: int) -> jax.Array:
    why = cpu_kernel_error()
    if why is not None:
        raise RuntimeError(f"the CPU quantized-matmul kernel is not available: {why}")
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k).astype(jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32),
                            vmap_method="broadcast_all")
    y = call(rows, weight, scales, biases, bits=np.int64(bits), group_size=np.int64(k // scales.shape[-1]))
    return y.reshape(lead + (n,)).astype(x.dtype)


# From this many rows of x (a prefill), dequantizing W once and handing XLA a dense dot
# beats the kernel: the dequantization is paid once per N x K, the multiply-adds M x N x K
# go to XLA's tuned GEMM. Not for matrices whose float32 copy would be large (a big
# vocabulary's head over a whole sequence).
DENSE_FROM_ROWS = 32
DENSE_MAX_ELEMENTS = 1 << 26


def qmatmul(x: jax.Array, weight: jax.Array, scales: jax.Array, biases: jax.Array, *, bits: int,
            kernel: str) -> jax.Array:
    """x [..., K] . W^T for a quantized W [N, *] (see the module docstring for ``kernel``)."""
    if kernel == "cpu":
        rows = int(np.prod(x.shape[:-1]))
        if rows >= DENSE_FROM_ROWS and weight.shape[0] * x.shape[-1] <= DENSE_MAX_ELEMENTS:
            return qmatmul_reference(x, weight, scales, biases, bits)
        return qmatmul_cpu(x, weight, scales, biases, bits)
    if kernel == "xla":
        return qmatmul_reference(x, weight, scales, biases, bits)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
