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
Parameter names mirror the HF checkpoints (``backbone.*``, ``lm_head``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs.archs.layers import (
    Embedding,
    Linear,
    RMSNorm,
    activation,
    last_valid,
    reading_config,
)
from mrs.cache import SSMCache, advance
from mrs.errors import UnsupportedModelError
from mrs.kernels.scan import selective_scan

MODEL_TYPES = ("mamba",)


@dataclass(frozen=True)
class MambaConfig:
    """The subset of a Mamba config.json mrs reads; unknown keys are ignored."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    state_size: int
    num_hidden_layers: int
    conv_kernel: int
    time_step_rank: int
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, config: dict) -> MambaConfig:
        if config.get("model_type") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {config.get('model_type')!r} is not a Mamba-1 model")
        with reading_config():
            hidden = int(config["hidden_size"])
            rank = config.get("time_step_rank", "auto")
            kernel = int(config.get("conv_kernel", 4))
            if kernel < 2:
                raise UnsupportedModelError(f"conv_kernel {kernel} must be at least 2")
            act = str(config.get("hidden_act", "silu"))
            activation(act)   # fail at load, not at the first call
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                # transformers derives it from expand and ignores a stored intermediate_size
                intermediate_size=int(config.get("expand", 2) * hidden),
                state_size=int(config.get("state_size", 16)),
                num_hidden_layers=int(config["num_hidden_layers"]),
                conv_kernel=kernel,
                time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
                layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
                use_bias=bool(config.get("use_bias", False)),
                use_conv_bias=bool(config.get("use_conv_bias", True)),
                hidden_act=act,
                residual_in_fp32=bool(config.get("residual_in_fp32", True)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            )


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution over time that carries its last K-1 inputs as state.

    weight [E, 1, K] as torch's Conv1d(groups=E) stores it.
    """

    def __init__(self, channels: int, kernel: int, *, bias: bool, dtype: Any):
        self.weight = nnx.Param(jnp.zeros((channels, 1, kernel), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype)) if bias else None

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
        self.in_proj = Linear(D, 2 * E, bias=cfg.use_bias, dtype=dtype)
        self.conv1d = CausalConv1d(E, cfg.conv_kernel, bias=cfg.use_conv_bias, dtype=dtype)
        self.x_proj = Linear(E, R + 2 * N, bias=False, dtype=dtype)
        self.dt_proj = Linear(R, E, bias=True, dtype=dtype)
        self.A_log = nnx.Param(jnp.zeros((E, N), dtype))
        self.D = nnx.Param(jnp.zeros((E,), dtype))
        self.out_proj = Linear(E, D, bias=cfg.use_bias, dtype=dtype)
        self.act = activation(cfg.hidden_act)
        self.rank, self.state_size = R, N

    def __call__(self, x, valid, conv_state, ssm_state):
        """x [B, T, D], valid [B, T] -> (out [B, T, D], conv_state, ssm_state)."""
        hidden, gate = jnp.split(self.in_proj(x), 2, axis=-1)                   # [B, T, E] each
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
                                                                   dtype=dtype)

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
        x = x.astype(self.backbone.embeddings.weight.dtype)
        logits = self.lm_head(x) if self.lm_head is not None else self.backbone.embeddings.attend(x)
        return logits, SSMCache(tuple(conv), tuple(ssm), advance(cache.lengths, positions), cache.max_len)

    @staticmethod
    def init_cache(cfg: MambaConfig, slots: int, max_len: int, dtype: Any) -> SSMCache:
        """Constant-size state; ``max_len`` is only recorded (see ``SSMCache.init``)."""
        return SSMCache.init(cfg.num_hidden_layers, slots, cfg.conv_kernel, cfg.intermediate_size,
                             cfg.state_size, dtype, max_len)


def rename(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Older checkpoints call the embeddings ``backbone.embedding``; transformers renames them too."""
    yield name.replace("backbone.embedding.", "backbone.embeddings."), array


def ignored(name: str) -> bool:
    """Checkpoint tensors that are tied copies, not weights."""
    return name == "lm_head.weight"
