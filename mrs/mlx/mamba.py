"""Mamba-1 (``mamba``) in MLX: the mirror of mrs/archs/mamba.py, on the same config and
checkpoint map (mrs/families/mamba.py) and the same parameter names and shapes.

Each block is ``x + mixer(rmsnorm(x))``: in_proj to (x, z), a causal depthwise
convolution carrying its last inputs, SiLU, (dt, B, C) from ``x_proj``, dt through
``dt_proj`` + softplus, the selective scan (mrs/mlx/scan.py: chunks solved in closed
form, not a loop over time) with the D skip and the SiLU(z) gate, then ``out_proj``.
Padding steps (positions -1) get dt = 0, the identity on the state; a row whose step
starts at position 0 starts from zero state.
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
    """Depthwise causal convolution over time; weight [E, 1, K] as torch's Conv1d(groups=E)."""

    def __init__(self, channels: int, kernel: int, *, bias: bool, dtype: Any):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel), dtype)
        if bias:
            self.bias = mx.zeros((channels,), dtype)
        self.has_bias = bias

    def __call__(self, x: mx.array, state: mx.array, valid: np.ndarray) -> tuple[mx.array, mx.array]:
        """x [B, T, E], state [B, K-1, E], valid [B] (host: non-padding steps) -> (y, new state)."""
        steps, kernel = x.shape[1], self.weight.shape[-1]
        xs = mx.concatenate([state.astype(x.dtype), x], axis=1)                   # [B, K-1+T, E]
        w = self.weight[:, 0, :]                                                  # [E, K]
        y = sum(xs[:, k:k + steps] * w[:, k] for k in range(kernel))
        if self.has_bias:
            y = y + self.bias
        index = mx.array((valid[:, None] + np.arange(kernel - 1)[None, :]).astype(np.int32))   # [B, K-1]
        return y, mx.take_along_axis(xs, index[:, :, None], axis=1).astype(state.dtype)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        D, E, N, R = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.in_proj = Linear(D, (2, E), bias=cfg.use_bias, dtype=dtype)         # x and z: [2, E, D]
        self.conv1d = CausalConv1d(E, cfg.conv_kernel, bias=cfg.use_conv_bias, dtype=dtype)
        self.x_proj = Linear(E, R + 2 * N, bias=False, dtype=dtype)
        self.dt_proj = Linear(R, E, bias=True, dtype=dtype)
        self.A_log = mx.zeros((E, N), dtype)
        self.D = mx.zeros((E,), dtype)
        self.out_proj = Linear(E, D, bias=cfg.use_bias, dtype=dtype)
        self.act = activation(cfg.hidden_act)
        self.rank, self.state_size = R, N

    def __call__(self, x, valid: mx.array, lengths: np.ndarray, conv_state, ssm_state):
        """x [B, T, D], valid [B, T] bool, lengths [B] valid steps (host) -> (out, conv_state, ssm_state)."""
        xz = self.in_proj(x)                                                      # [B, T, 2, E]
        hidden, gate = xz[..., 0, :], xz[..., 1, :]
        hidden, conv_state = self.conv1d(hidden, conv_state, lengths)
        hidden = self.act(hidden)
        proj = self.x_proj(hidden)
        dt, B, C = proj[..., :self.rank], proj[..., self.rank:self.rank + self.state_size], \
            proj[..., self.rank + self.state_size:]
        dt = nn.softplus(self.dt_proj(dt).astype(mx.float32))                    # [B, T, E]
        dt = mx.where(valid[..., None], dt, 0.0)                                  # padding: identity step
        A = -mx.exp(self.A_log.astype(mx.float32))                                # [E, N]
        y, ssm_state = selective_scan(hidden, dt, A, B, C, self.D, gate, ssm_state)
        return self.out_proj(y.astype(x.dtype)), conv_state, ssm_state


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.mixer = MambaMixer(cfg, dtype)
        self.dtype = dtype

    def __call__(self, x, valid, lengths, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer(self.norm(x.astype(self.dtype)), valid, lengths, conv_state,
                                                ssm_state)
        return x + out, conv_state, ssm_state


class MambaBody(nn.Module):
    def __init__(self, cfg: MambaConfig, dtype: Any):
        super().__init__()
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [MambaBlock(cfg, dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)


class MambaForCausalLM(nn.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; host positions -1 mark padding."""

    def __init__(self, cfg: MambaConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.backbone = MambaBody(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.dtype = dtype

    def __call__(self, tokens: mx.array, positions: np.ndarray, cache: SSMCache, *, last_only: bool = False):
        valid_host = positions >= 0                                               # [B, T]
        valid, lengths = mx.array(valid_host), valid_host.sum(axis=1).astype(np.int32)
        fresh = mx.array(positions[:, 0] == 0)[:, None, None]                     # [B, 1, 1]
        x = self.backbone.embeddings(tokens)                                      # [B, T, D]
        if self.config.residual_in_fp32:
            x = x.astype(mx.float32)
        for i, layer in enumerate(self.backbone.layers):
            conv_in = mx.where(fresh, 0.0, cache.conv[i]).astype(cache.conv[i].dtype)
            ssm_in = mx.where(fresh, 0.0, cache.ssm[i])
            x, cache.conv[i], cache.ssm[i] = layer(x, valid, lengths, conv_in, ssm_in)
        cache.lengths = advance(cache.lengths, positions)
        x = self.backbone.norm_f(x)
        if last_only:
            x = last_valid(x, positions)
        x = x.astype(self.dtype)                      # the compute dtype (the head may be quantized)
        logits = self.lm_head(x) if "lm_head" in self else self.backbone.embeddings.attend(x)
        return logits, cache

    @staticmethod
    def init_cache(cfg: MambaConfig, slots: int, max_len: int, dtype: Any) -> SSMCache:
        """Constant-size state; ``max_len`` is only recorded."""
        return SSMCache.init(cfg.num_hidden_layers, slots, cfg.conv_kernel, cfg.intermediate_size,
                             cfg.state_size, dtype, max_len)
