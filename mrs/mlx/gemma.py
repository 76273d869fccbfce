"""Gemma, Gemma 2 and Gemma 3 (text) in MLX: the mirror of mrs/archs/gemma.py, on the same
config and checkpoint map (mrs/families/gemma.py).

Gemma's choices over Llama's decoder: embeddings times sqrt(hidden), RMSNorm as
``(1 + w)`` in float32, GeGLU, a tied head; Gemma 2/3 sandwich norms, Gemma 2 soft-caps
scores and logits, Gemma 3 norms q and k per head and gives local layers their own rope.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mrs.families.gemma import MODEL_TYPES, GemmaConfig  # noqa: F401  (re-exported)
from mrs.mlx.cache import KVCache, advance
from mrs.mlx.layers import (
    Embedding,
    GatedMLP,
    Linear,
    StepPositions,
    last_valid,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    split_qkv,
)


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), all in float32, then cast back."""

    def __init__(self, dim: int, *, eps: float, dtype: Any):
        super().__init__()
        self.weight = mx.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        h = x.astype(mx.float32)
        h = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight.astype(mx.float32))).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int, dtype: Any):
        super().__init__()
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=cfg.attention_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = GemmaRMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
        self.qk_norm, self.scale, self.softcap = cfg.qk_norm, cfg.scale, cfg.attn_softcap
        self.window = cfg.sliding_windows[layer]

    def __call__(self, x, at: StepPositions, cos, sin, keys, values):
        q, k, v = split_qkv(self.qkv_proj(x))                                     # [B, T, N|K, H]
        out, keys, values = rotary_attention(
            q, k, v, cos, sin, keys, values, at, scale=self.scale, window=self.window,
            q_norm=self.q_norm if self.qk_norm else None, k_norm=self.k_norm if self.qk_norm else None,
            softcap=self.softcap)
        return self.o_proj(out), keys, values


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int, dtype: Any):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(D, eps=eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(D, eps=eps, dtype=dtype)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(D, eps=eps, dtype=dtype)
            self.post_feedforward_layernorm = GemmaRMSNorm(D, eps=eps, dtype=dtype)
        self.mlp = GatedMLP(D, cfg.intermediate_size, act=cfg.hidden_act, bias=False, dtype=dtype)
        self.sandwich = cfg.sandwich_norms
        self.local = cfg.sliding_windows[layer] is not None

    def __call__(self, x, at, cos, sin, keys, values):
        attn, keys, values = self.self_attn(self.input_layernorm(x), at, cos, sin, keys, values)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), keys, values
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), keys, values


class GemmaBody(nn.Module):
    def __init__(self, cfg: GemmaConfig, dtype: Any):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class GemmaForCausalLM(nn.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; host positions -1 mark padding."""

    def __init__(self, cfg: GemmaConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.model = GemmaBody(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def __call__(self, tokens: mx.array, positions: np.ndarray, cache: KVCache, *, last_only: bool = False):
        cfg = self.config
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        x = x * mx.array(cfg.embed_scale, x.dtype)       # rounded to the compute dtype first, as transformers does
        tables = {"global": rope_cos_sin(cfg.rope, positions)}
        tables["local"] = tables["global"] if cfg.local_rope == cfg.rope else rope_cos_sin(cfg.local_rope, positions)
        at = StepPositions(positions, cache.max_len)
        for i, layer in enumerate(self.model.layers):
            cos, sin = tables["local" if layer.local else "global"]
            x, cache.keys[i], cache.values[i] = layer(x, at, cos, sin, cache.keys[i], cache.values[i])
        cache.lengths = advance(cache.lengths, positions)
        x = self.model.norm(x)
        if last_only:
            x = last_valid(x, positions)
        logits = self.lm_head(x) if "lm_head" in self else self.model.embed_tokens.attend(x)
        if cfg.final_softcap is not None:
            logits = mx.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits, cache

    @staticmethod
    def init_cache(cfg: GemmaConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)
