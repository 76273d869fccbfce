"""Mamba-1 (``mamba``) in MLX: the mirror of mrs/archs/mamba.py, on the same config and
checkpoint map (mrs/families/mamba.py) and the same parameter names and shapes.

Each block is ``x + mixer(rmsnorm(x))``; the mixer projects to (x, z), runs x through
a causal depthwise convolution and SiLU, derives (dt, B, C) with ``x_proj``,
discretises dt with ``dt_proj`` + softplus, runs the selective scan (mrs/mlx/scan.py)
with the D skip and the SiLU(z) gate, and projects back with ``out_proj``. The per-slot
state (the convolution's last inputs and the SSM state) lives in an ``SSMCache``
(mrs/mlx/cache.py), so a prompt is one chunked scan and a decode step one update.

Right-padded batches: padding steps (positions -1) get dt = 0, which leaves the SSM
state untouched, and the convolution state keeps each row's last *valid* inputs.
Positions are host data here, so which rows are fresh or padded is known before any
op is built, and a step with none builds no masks.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mrs.families.mamba import MODEL_TYPES, MambaConfig  # noqa: F401  (re-exported)
from mrs.mlx.cache import SSMCache, advance
from mrs.mlx.layers import Embedding, Linear, RMSNorm, activation, last_valid
from mrs.mlx.scan import selective_scan


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time that carries its last K-1 inputs as state.

    weight [E, 1, K] as torch's Conv1d(groups=E) stores it.
    """

    def __init__(self, channels: int, kernel: int, *, bias: bool, dtype: Any):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel), dtype)
        if bias:
            self.bias = mx.zeros((channels,), dtype)
        self.has_bias = bias

    def __call__(self, x: mx.array, state: mx.array, valid: np.ndarray) -> tuple[mx.array, mx.array]:
        """x [B, T, E], state [B, K-1, E], valid [B] (host: non-padding steps) -> (y [B, T, E], new state)."""
        steps = x.shape[1]
        kernel = self.weight.shape[-1]
        xs = mx.concatenate([state.astype(x.dtype), x], axis=1)                 # [B, K-1+T, E]
        w = self.weight[:, 0, :]                                                 # [E, K]
        y = sum(xs[:, k:k + steps] * w[:, k] for k in range(kernel))
        if self.has_bias:
            y = y + self.bias
        if (valid == steps).all():                                               # no padding: the last K-1
            new_state = xs[:, steps:]
        else:
            index = mx.array((valid[:, None] + np.arange(kernel - 1)[None, :]).astype(np.int32))   # [B, K-1]
            new_state = mx.take_along_axis(xs, index[:, :, None], axis=1)
        return y, new_state.astype(state.dtype)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        D, E, N, R = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        # in_proj [2, E, D]: x and z keep the inner axis whole (the checkpoint's [2E, D] splits at load)
        self.in_proj = Linear(D, (2, E), bias=cfg.use_bias, dtype=dtype)
        self.conv1d = CausalConv1d(E, cfg.conv_kernel, bias=cfg.use_conv_bias, dtype=dtype)
        self.x_proj = Linear(E, R + 2 * N, bias=False, dtype=dtype)
        self.dt_proj = Linear(R, E, bias=True, dtype=dtype)
        self.A_log = mx.zeros((E, N), dtype)
        self.D = mx.zeros((E,), dtype)
        self.out_proj = Linear(E, D, bias=cfg.use_bias, dtype=dtype)
        self.act = activation(cfg.hidden_act)
        self.rank, self.state_size = R, N

    def __call__(self, x, valid, conv_state, ssm_state):
        """x [B, T, D], valid [B, T] (host bool) -> (out [B, T, D], conv_state, ssm_state)."""
        xz = self.in_proj(x)                                                      # [B, T, 2, E]
        hidden, gate = xz[..., 0, :], xz[..., 1, :]
        hidden, conv_state = self.conv1d(hidden, conv_state, valid.sum(axis=1))
        hidden = self.act(hidden)
        dt, B, C = mx.split(self.x_proj(hidden), [self.rank, self.rank + self.state_size], axis=-1)
        dt = nn.softplus(self.dt_proj(dt).astype(mx.float32))                    # [B, T, E]
        if not valid.all():
            dt = mx.where(mx.array(valid)[..., None], dt, 0.0)                   # padding: identity step
        A = -mx.exp(self.A_log.astype(mx.float32))                               # [E, N]
        y, ssm_state = selective_scan(hidden, dt, A, B, C, self.D, gate, ssm_state)
        return self.out_proj(y.astype(x.dtype)), conv_state, ssm_state


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.mixer = MambaMixer(cfg, dtype)
        self.dtype = dtype

    def __call__(self, x, valid, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer(self.norm(x.astype(self.dtype)), valid, conv_state, ssm_state)
        return x + out, conv_state, ssm_state


class MambaBody(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [MambaBlock(cfg, dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)


class MambaForCausalLM(nn.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; host positions -1 mark padding.

    Positions matter only as validity and as the fresh-start signal (a row whose
    step begins at position 0 starts from zero state); the model has no position code.
    """

    def __init__(self, cfg: MambaConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.backbone = MambaBody(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def __call__(self, tokens: mx.array, positions: np.ndarray, cache: SSMCache, *, last_only: bool = False):
        cfg = self.config
        positions = np.asarray(positions)
        valid = positions >= 0                                                   # [B, T] (host)
        fresh = positions[:, 0] == 0                                             # [B]
        keep = None if not fresh.any() or fresh.all() else mx.array(~fresh)[:, None, None]
        x = self.backbone.embeddings(tokens)                                     # [B, T, D]
        if cfg.residual_in_fp32:
            x = x.astype(mx.float32)
        for i, layer in enumerate(self.backbone.layers):
            conv_in, ssm_in = cache.conv[i], cache.ssm[i]
            if fresh.all():
                conv_in, ssm_in = mx.zeros_like(conv_in), mx.zeros_like(ssm_in)
            elif keep is not None:
                conv_in, ssm_in = mx.where(keep, conv_in, 0), mx.where(keep, ssm_in, 0)
            x, cache.conv[i], cache.ssm[i] = layer(x, valid, conv_in, ssm_in)
        cache.lengths = advance(cache.lengths, positions)
        x = self.backbone.norm_f(x)
        if last_only:
            x = last_valid(x, positions)
        x = x.astype(self.backbone.norm_f.weight.dtype)          # the compute dtype (the head may be quantized)
        logits = self.lm_head(x) if "lm_head" in self else self.backbone.embeddings.attend(x)
        return logits, cache

    @staticmethod
    def init_cache(cfg: MambaConfig, slots: int, max_len: int, dtype: Any) -> SSMCache:
        """Constant-size state; ``max_len`` is only recorded (see ``SSMCache.init``)."""
        return SSMCache.init(cfg.num_hidden_layers, slots, cfg.conv_kernel, cfg.intermediate_size,
                             cfg.state_size, dtype, max_len)
