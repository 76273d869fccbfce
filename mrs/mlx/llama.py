"""Llama and its close kin in MLX (Llama 2/3/3.1/3.2, Mistral, Granite, Qwen2, Qwen3):
the mirror of mrs/archs/llama.py, on the same config and checkpoint map
(mrs/families/llama.py) and the same parameter names and shapes.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mrs.families.llama import MODEL_TYPES, LlamaConfig  # noqa: F401  (re-exported)
from mrs.mlx.cache import KVCache, advance
from mrs.mlx.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    StepPositions,
    last_valid,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    split_qkv,
)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        super().__init__()
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else H ** -0.5
        self.window = cfg.sliding_windows[layer]
        self.qk_norm = cfg.qk_norm

    def __call__(self, x, at: StepPositions, cos, sin, keys, values):
        q, k, v = split_qkv(self.qkv_proj(x))                                     # [B, T, N|K, H]
        out, keys, values = rotary_attention(
            q, k, v, cos, sin, keys, values, at, scale=self.scale, window=self.window,
            q_norm=self.q_norm if self.qk_norm else None, k_norm=self.k_norm if self.qk_norm else None)
        return self.o_proj(out), keys, values


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, bias=cfg.mlp_bias,
                            dtype=dtype)
        self.residual_multiplier = cfg.residual_multiplier

    def __call__(self, x, at, cos, sin, keys, values):
        attn, keys, values = self.self_attn(self.input_layernorm(x), at, cos, sin, keys, values)
        x = x + attn * self.residual_multiplier
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier
        return x, keys, values


class LlamaBody(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype: Any):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nn.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; host positions -1 mark padding."""

    def __init__(self, cfg: LlamaConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def __call__(self, tokens: mx.array, positions: np.ndarray, cache: KVCache, *, last_only: bool = False):
        cfg = self.config
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        cos, sin = rope_cos_sin(cfg.rope, positions)
        at = StepPositions(positions, cache.max_len)
        for i, layer in enumerate(self.model.layers):
            x, cache.keys[i], cache.values[i] = layer(x, at, cos, sin, cache.keys[i], cache.values[i])
        cache.lengths = advance(cache.lengths, positions)
        x = self.model.norm(x)
        if last_only:
            x = last_valid(x, positions)
        logits = self.lm_head(x) if "lm_head" in self else self.model.embed_tokens.attend(x)
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        return logits, cache

    @staticmethod
    def init_cache(cfg: LlamaConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)
