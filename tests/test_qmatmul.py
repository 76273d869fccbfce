"""The quantized matmul: mrs's C++ CPU kernel and the jnp reference, each held to numpy's
dequantize-then-dot for every format, group size and odd shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrs import quant
from mrs.kernels import qmatmul as qm

KERNEL = jax.jit(qm.qmatmul, static_argnames=("bits", "kernel"))
CPU_KERNEL = jax.jit(qm.qmatmul_cpu, static_argnames=("bits",))      # the C++ kernel at any row count


def case(bits: int, group: int, m: int, n: int, k: int, scale_dtype: str, seed: int):
    rng = np.random.default_rng(seed)
    q = quant.quantize(rng.standard_normal((n, k)).astype(np.float32), bits, group)
    stored = q.packed(quant.QuantFormat(bits, group, "float32"))
    stored = {name: (a if name == "weight" else a.astype(scale_dtype)) for name, a in stored.items()}
    x = rng.standard_normal((m, k)).astype(np.float32)
    dense = quant.dequantize(stored["weight"], stored["scales"], stored["biases"], bits)
    return x, stored, x.astype(np.float64) @ dense.T.astype(np.float64)


def close(got, want, k):
    """Float32 rounding of a k-term dot: relative to the sum of |terms|, not the result."""
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * k * max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module")
def cpu_kernel():
    why = qm.cpu_kernel_error()
    if why is not None:
        pytest.fail(f"the CPU kernel must build on CI machines: {why}")


@pytest.mark.parametrize("kernel", qm.KERNELS)
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_every_format_matches_dequantize_then_dot(cpu_kernel, kernel, bits, group, scale_dtype):
    k = 256
    x, w, want = case(bits, group, 5, 37, k, scale_dtype, bits * group)
    got = KERNEL(jnp.asarray(x), *(jnp.asarray(w[n]) for n in quant.LEAVES), bits=bits, kernel=kernel)
    close(got, want, k)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(quant.BITS), group=st.sampled_from(quant.GROUP_SIZES), m=st.integers(1, 40),
       n=st.integers(1, 70), groups=st.integers(1, 4), seed=st.integers(0, 1000))
def test_random_shapes_match_the_reference(cpu_kernel, bits, group, m, n, groups, seed):
    k = max(group, 32) * groups
    x, w, want = case(bits, group, m, n, k, "float16" if seed % 2 else "float32", seed)
    got = CPU_KERNEL(jnp.asarray(x), *(jnp.asarray(w[n_]) for n_ in quant.LEAVES), bits=bits)
    close(got, want, k)


def test_a_prefill_hands_xla_one_dense_copy_and_a_decode_none(cpu_kernel):
    """From DENSE_FROM_ROWS rows the dispatch dequantizes once for XLA's GEMM; below, the kernel."""
    for m in (qm.DENSE_FROM_ROWS - 1, qm.DENSE_FROM_ROWS):
        x, w, want = case(8, 32, m, 2048, 512, "float16", m)
        args = [jnp.asarray(x)] + [jnp.asarray(w[n]) for n in quant.LEAVES]
        close(KERNEL(*args, bits=8, kernel="cpu"), want, 512)
        temp = KERNEL.lower(*args, bits=8, kernel="cpu").compile().memory_analysis().temp_size_in_bytes
        assert (temp >= 2048 * 512 * 4) == (m >= qm.DENSE_FROM_ROWS), (m, temp)


def test_leading_axes_and_dtypes_pass_through(cpu_kernel):
    x, w, want = case(4, 32, 6, 24, 128, "float32", 3)
    args = [jnp.asarray(w[n]) for n in quant.LEAVES]
    got = KERNEL(jnp.asarray(x).reshape(2, 3, 128).astype(jnp.bfloat16), *args, bits=4, kernel="cpu")
    assert got.shape == (2, 3, 24) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)).reshape(6, 24), want, rtol=0.05, atol=0.5)


def test_the_compiled_cpu_step_holds_no_dense_copy_of_the_weight(cpu_kernel):
    """What the kernel is for: XLA would expand a converted weight into a float32 temporary."""
    x, w, _ = case(8, 32, 1, 4096, 1024, "float16", 0)
    args = [jnp.asarray(x)] + [jnp.asarray(w[n]) for n in quant.LEAVES]
    dense_bytes = 4096 * 1024 * 4
    ours = KERNEL.lower(*args, bits=8, kernel="cpu").compile().memory_analysis()
    reference = KERNEL.lower(*args, bits=8, kernel="xla").compile().memory_analysis()
    assert ours.temp_size_in_bytes < dense_bytes / 8
    assert reference.temp_size_in_bytes >= dense_bytes      # the check can fail: XLA's CPU path does copy


def test_a_missing_compiler_is_one_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MRS_KERNEL_CACHE", str(tmp_path / "cache"))
    qm._library.cache_clear()
    try:
        lib, why = qm._library()
        assert lib is None and "no-such-compiler" in why
    finally:
        qm._library.cache_clear()


@pytest.mark.parametrize("bits", quant.BITS)
def test_the_cpu_kernel_is_differentiable_in_x_as_its_reference(cpu_kernel, bits):
    """QLoRA trains through the kernel: d/dx of x . W^T is the cotangent . W, read dequantized."""
    x, w, _ = case(bits, 32, 3, 24, 128, "float16", bits)
    leaves = [jnp.asarray(w[n]) for n in quant.LEAVES]
    cotangent = np.random.default_rng(1).standard_normal((3, 24)).astype(np.float32)

    def pulled(f):
        return jax.grad(lambda x: jnp.sum(f(x, *leaves, bits) * cotangent))(jnp.asarray(x))
    got, want = pulled(qm.qmatmul_cpu), pulled(qm.qmatmul_reference)
    assert np.abs(np.asarray(want)).max() > 0.1
    close(got, np.asarray(want, np.float64), 24)
