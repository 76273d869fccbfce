"""Mamba-1 selective scan: the recurrence every Mamba layer runs over time.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          h: [E, N] per row
    y_t = (h_t . C_t) + D * x_t, then gated: y_t * silu(z_t)

Shapes (letters as in mrs/archs/layers.py, plus E = inner channels, N = state size,
Q = chunk length): x, dt, z [B, T, E]; A [E, N]; B, C [B, T, N]; D [E]; h [B, E, N].
dt is already discretised (softplus of dt_proj) and 0 at padding steps, which makes
a step the identity on h. The state is float32 whatever the model dtype.

``selective_scan`` is what models call. Today it dispatches to
``selective_scan_reference`` (pure jnp, chunked: a ``lax.scan`` over chunks of Q
steps whose discretisation is computed for the whole chunk at once and whose
recurrence is unrolled inside it, so only [B, Q, E, N] is ever materialised; an
``associative_scan`` per chunk computes the same but compiles several times
slower on CPU); a Pallas kernel will slot in behind the same signature.
``selective_scan_loop`` is the plain one-step-at-a-time definition the tests hold
both to, and ``selective_step`` is the single-token decode update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 8   # steps unrolled per chunk: longer chunks compile slower and run no faster on CPU


def selective_step(x, dt, A, B, C, D, z, h):
    """One token: x, dt, z [B, E]; B, C [B, N]; h [B, E, N] -> (y [B, E] float32, new h)."""
    x32 = x.astype(jnp.float32)
    dA = jnp.exp(dt[..., None] * A)                                           # [B, E, N]
    dBx = (dt * x32)[..., None] * B.astype(jnp.float32)[:, None, :]           # [B, E, N]
    h = dA * h + dBx
    y = jnp.einsum("BEN,BN->BE", h, C.astype(jnp.float32)) + x32 * D.astype(jnp.float32)
    return y * jax.nn.silu(z.astype(jnp.float32)), h


def selective_scan_loop(x, dt, A, B, C, D, z, h0):
    """The definition, one step at a time (slow to compile for long T; tests only)."""
    def step(h, inputs):
        y, h = selective_step(*inputs[:2], A, *inputs[2:4], D, inputs[4], h)
        return h, y

    inputs = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C, z))
    h, ys = jax.lax.scan(step, h0, inputs)
    return jnp.moveaxis(ys, 0, 1), h


def selective_scan_reference(x, dt, A, B, C, D, z, h0, *, chunk: int = CHUNK):
    """Pure-jnp chunked scan: (y [B, T, E] float32, final h [B, E, N] float32)."""
    batch, steps, inner = x.shape
    q = min(chunk, steps)
    pad = -steps % q
    if pad:   # dt = 0 steps are the identity on h; their outputs are cut off below
        x, dt, B, C, z = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (x, dt, B, C, z))
    chunks = (steps + pad) // q

    def split(a):                                                             # [B, T, .] -> [T/Q, B, Q, .]
        return jnp.moveaxis(a.reshape(batch, chunks, q, a.shape[-1]), 1, 0)

    def body(h, inputs):
        x_c, dt_c, b_c, c_c = inputs
        dA = jnp.exp(dt_c[..., None] * A)                                     # [B, Q, E, N]
        dBx = (dt_c * x_c.astype(jnp.float32))[..., None] * b_c.astype(jnp.float32)[:, :, None, :]
        hs = []
        for t in range(q):                                                    # unrolled: Q is small
            h = dA[:, t] * h + dBx[:, t]
            hs.append(h)
        y = jnp.einsum("BQEN,BQN->BQE", jnp.stack(hs, axis=1), c_c.astype(jnp.float32))
        return h, y

    h, ys = jax.lax.scan(body, h0, tuple(split(a) for a in (x, dt, B, C)))
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, chunks * q, inner)[:, :steps]
    x, z = x[:, :steps], z[:, :steps]
    y = y + x.astype(jnp.float32) * D.astype(jnp.float32)
    return y * jax.nn.silu(z.astype(jnp.float32)), h


def selective_scan(x, dt, A, B, C, D, z, h0):
    """The selective scan models call: (y [B, T, E] float32, final state [B, E, N] float32)."""
    if x.shape[1] == 1:
        y, h = selective_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], h0)
        return y[:, None], h
    return selective_scan_reference(x, dt, A, B, C, D, z, h0)
