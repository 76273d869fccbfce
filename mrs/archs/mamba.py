"""Mamba-1 (``mamba``): a state-space model with no attention and no KV cache.

Each block is ``x + mixer(rmsnorm(x))``; the mixer projects to (x, z), runs x through
a causal depthwise convolution and SiLU, derives the input-dependent (dt, B, C) with
``x_proj``, discretises dt with ``dt_proj`` + softplus, runs the selective scan
(mrs/kernels/scan.py) with the D skip and the SiLU(z) gate, and projects back with
``out_proj``. Its per-slot state (the convolution's last inputs and the SSM state)
lives in an ``SSMCache`` with the same slot/lengths contract as the KV cache, so the
engine runs Mamba without knowing it: a prompt is one chunked scan, a decode step
one recurrence update, and memory stays constant however long the output grows.

Right-padded batches: padding steps (positions -1) get dt = 0, which leaves the SSM
state untouched, and the convolution state keeps each row's last *valid* inputs.
Parameter names mirror the HF checkpoints (``backbone.*``, ``lm_head``); the config and
the checkpoint map are backend-free, in mrs/families/mamba.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import (
    Embedding,
    Linear,
    RMSNorm,
    activation,
    last_valid,
    param,
)
from mrs.cache import SSMCache, advance
from mrs.families.mamba import MODEL_TYPES, MambaConfig  # noqa: F401  (the family's config, re-exported)
from mrs.kernels.scan import selective_scan


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution over time that carries its last K-1 inputs as state.

    weight [E, 1, K] as torch's Conv1d(groups=E) stores it.
    """

    def __init__(self, channels: int, kernel: int, *, bias: bool, dtype: Any):
        self.weight = param((channels, 1, kernel), dtype, ("inner", "conv_group", "conv"))
        self.bias = param((channels,), dtype, ("inner",)) if bias else None

    def __call__(self, x: jax.Array, state: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, E], state [B, K-1, E], valid [B] (non-padding steps) -> (y [B, T, E], new state)."""
        steps = x.shape[1]
        kernel = self.weight.shape[-1]
        xs = jnp.concatenate([state.astype(x.dtype), x], axis=1)                # [B, K-1+T, E]
        w = self.weight[...][:, 0, :]                                            # [E, K]
        y = sum(xs[:, k:k + steps] * w[:, k] for k in range(kernel))
        if self.bias is not None:
            y = y + self.bias[...]
        index = valid[:, None] + jnp.arange(kernel - 1)[None, :]                # [B, K-1]
        new_state = jnp.take_along_axis(xs, index[:, :, None], axis=1)
        return y, new_state.astype(state.dtype)


class MambaMixer(nnx.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        D, E, N, R = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        # in_proj [2, E, D]: x and z keep the inner axis whole (the checkpoint's [2E, D] splits at load)
        self.in_proj = Linear(D, (2, E), bias=cfg.use_bias, dtype=dtype, axes=("xz", "inner", "embed"))
        self.conv1d = CausalConv1d(E, cfg.conv_kernel, bias=cfg.use_conv_bias, dtype=dtype)
        self.x_proj = Linear(E, R + 2 * N, bias=False, dtype=dtype, axes=("dt_bc", "inner"))
        self.dt_proj = Linear(R, E, bias=True, dtype=dtype, axes=("inner", "dt_rank"))
        self.A_log = param((E, N), dtype, ("inner", "state"))
        self.D = param((E,), dtype, ("inner",))
        self.out_proj = Linear(E, D, bias=cfg.use_bias, dtype=dtype, axes=("embed", "inner"))
        self.act = activation(cfg.hidden_act)
        self.rank, self.state_size = R, N

    def __call__(self, x, valid, conv_state, ssm_state):
        """x [B, T, D], valid [B, T] -> (out [B, T, D], conv_state, ssm_state)."""
        xz = self.in_proj(x)                                                      # [B, T, 2, E]
        hidden, gate = xz[..., 0, :], xz[..., 1, :]
        hidden, conv_state = self.conv1d(hidden, conv_state, jnp.sum(valid, axis=1))
        hidden = self.act(hidden)
        dt, B, C = jnp.split(self.x_proj(hidden), [self.rank, self.rank + self.state_size], axis=-1)
        dt = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))               # [B, T, E]
        dt = jnp.where(valid[..., None], dt, 0.0)                                # padding: identity step
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                        # [E, N]
        y, ssm_state = selective_scan(hidden, dt, A, B, C, self.D[...], gate, ssm_state)
        return self.out_proj(y.astype(x.dtype)), conv_state, ssm_state


class MambaBlock(nnx.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.mixer = MambaMixer(cfg, dtype)
        self.dtype = dtype

    def __call__(self, x, valid, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer(self.norm(x.astype(self.dtype)), valid, conv_state, ssm_state)
        return x + out, conv_state, ssm_state


class MambaBody(nnx.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([MambaBlock(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)


class MambaForCausalLM(nnx.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; positions -1 mark padding.

    Positions matter only as validity and as the fresh-start signal (a row whose
    step begins at position 0 starts from zero state); the model has no position code.
    """

    def __init__(self, cfg: MambaConfig, dtype: Any = jnp.float32):
        self.config = cfg
        self.backbone = MambaBody(cfg, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                   dtype=dtype, axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: SSMCache, *, last_only: bool = False):
        cfg = self.config
        valid = positions >= 0                                                   # [B, T]
        fresh = (positions[:, 0] == 0)[:, None, None]                            # [B, 1, 1]
        x = self.backbone.embeddings(tokens)                                     # [B, T, D]
        if cfg.residual_in_fp32:
            x = x.astype(jnp.float32)
        conv, ssm = list(cache.conv), list(cache.ssm)
        for i, layer in enumerate(self.backbone.layers):
            conv_in = jnp.where(fresh, jnp.zeros_like(conv[i]), conv[i])
            ssm_in = jnp.where(fresh, jnp.zeros_like(ssm[i]), ssm[i])
            x, conv[i], ssm[i] = layer(x, valid, conv_in, ssm_in)
        x = self.backbone.norm_f(x)
        if last_only:
            x = last_valid(x, positions)
        x = x.astype(self.backbone.norm_f.weight.dtype)           # the compute dtype (the head may be quantized)
        logits = self.lm_head(x) if self.lm_head is not None else self.backbone.embeddings.attend(x)
        return logits, SSMCache(tuple(conv), tuple(ssm), advance(cache.lengths, positions), cache.max_len)

    @staticmethod
    def init_cache(cfg: MambaConfig, slots: int, max_len: int, dtype: Any) -> SSMCache:
        """Constant-size state; ``max_len`` is only recorded (see ``SSMCache.init``)."""
        return SSMCache.init(cfg.num_hidden_layers, slots, cfg.conv_kernel, cfg.intermediate_size,
                             cfg.state_size, dtype, max_len)
