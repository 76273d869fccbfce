"""Llama and its close kin in Flax: Llama 2/3/3.1/3.2, Mistral, Granite, Qwen2, Qwen3.

One pre-norm decoder (RMSNorm -> GQA attention with rotary -> RMSNorm -> SwiGLU); the
config and the checkpoint map are backend-free, in mrs/families/llama.py. q/k/v are
one [K, G + 2, H, D] projection and gate/up one [2, F, D] (mrs.archs.layers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    last_valid,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    split_qkv,
)
from mrs.cache import KVCache, advance
from mrs.families.llama import MODEL_TYPES, LlamaConfig  # noqa: F401  (the family's config, re-exported)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, dtype=dtype, axes=("embed", "heads"))  # in: N*H, whole heads
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim")
            self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim")
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else H ** -0.5
        self.window = cfg.sliding_windows[layer]
        self.qk_norm = cfg.qk_norm

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        q, k, v = split_qkv(self.qkv_proj(x))                                     # [B, T, N|K, H]
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions, scale=self.scale, window=self.window,
            q_norm=self.q_norm if self.qk_norm else None, k_norm=self.k_norm if self.qk_norm else None)
        return self.o_proj(out), cache_keys, cache_values


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, bias=cfg.mlp_bias,
                            dtype=dtype)
        self.residual_multiplier = cfg.residual_multiplier

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        attn, cache_keys, cache_values = self.self_attn(
            self.input_layernorm(x), positions, cos, sin, cache_keys, cache_values)
        x = x + attn * self.residual_multiplier
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier
        return x, cache_keys, cache_values


class LlamaBody(nnx.Module):
    """Embeddings, decoder layers, final norm (HF's ``model.*`` params)."""

    def __init__(self, cfg: LlamaConfig, dtype: Any):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; positions -1 mark padding."""

    def __init__(self, cfg: LlamaConfig, dtype: Any = jnp.float32):
        self.config = cfg
        self.model = LlamaBody(cfg, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                   dtype=dtype, axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, last_only: bool = False):
        cfg = self.config
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        if cfg.embedding_multiplier != 1.0:
            x = x * jnp.asarray(cfg.embedding_multiplier, x.dtype)
        cos, sin = rope_cos_sin(cfg.rope, positions)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.model.layers):
            x, keys[i], values[i] = layer(x, positions, cos, sin, keys[i], values[i])
        x = self.model.norm(x)
        if last_only:
            x = last_valid(x, positions)
        logits = self.lm_head(x) if self.lm_head is not None else self.model.embed_tokens.attend(x)
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        return logits, KVCache(tuple(keys), tuple(values), advance(cache.lengths, positions))

    @staticmethod
    def init_cache(cfg: LlamaConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)
