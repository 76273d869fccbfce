"""Gemma, Gemma 2 and Gemma 3 (text) in Flax.

A pre-norm decoder like Llama's with Gemma's choices: embeddings times sqrt(hidden),
RMSNorm weights applied as ``(1 + w)`` in float32, GeGLU, a tied output head; Gemma 2
and 3 wrap attention and MLP in "sandwich" norms (before and after each), Gemma 2
soft-caps attention scores and logits, Gemma 3 norms q and k per head and gives its
local (sliding-window) and global layers their own rope. The config and the checkpoint
map are backend-free, in mrs/families/gemma.py.
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
    last_valid,
    param,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    split_qkv,
)
from mrs.cache import KVCache, advance
from mrs.families.gemma import MODEL_TYPES, GemmaConfig  # noqa: F401  (the family's config, re-exported)


class GemmaRMSNorm(nnx.Module):
    """x / rms(x) * (1 + w), all in float32, then cast back (transformers' Gemma order)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, axis: str = "embed"):
        self.weight = param((dim,), dtype, (axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GemmaConfig, layer: int, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=cfg.attention_bias, dtype=dtype, axes=("embed", "heads"))
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim")
            self.k_norm = GemmaRMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim")
        self.qk_norm, self.scale, self.softcap = cfg.qk_norm, cfg.scale, cfg.attn_softcap
        self.window = cfg.sliding_windows[layer]

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        q, k, v = split_qkv(self.qkv_proj(x))                                     # [B, T, N|K, H]
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions, scale=self.scale, window=self.window,
            q_norm=self.q_norm if self.qk_norm else None, k_norm=self.k_norm if self.qk_norm else None,
            softcap=self.softcap)
        return self.o_proj(out), cache_keys, cache_values


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: GemmaConfig, layer: int, dtype: Any):
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

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        attn, cache_keys, cache_values = self.self_attn(
            self.input_layernorm(x), positions, cos, sin, cache_keys, cache_values)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), \
                cache_keys, cache_values
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache_keys, cache_values


class GemmaBody(nnx.Module):
    """Embeddings, decoder layers, final norm (HF's ``model.*`` params)."""

    def __init__(self, cfg: GemmaConfig, dtype: Any):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class GemmaForCausalLM(nnx.Module):
    """``model(tokens, positions, cache) -> (logits, cache)``; positions -1 mark padding."""

    def __init__(self, cfg: GemmaConfig, dtype: Any = jnp.float32):
        self.config = cfg
        self.model = GemmaBody(cfg, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                   dtype=dtype, axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, last_only: bool = False):
        cfg = self.config
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        tables = {"global": rope_cos_sin(cfg.rope, positions)}
        tables["local"] = tables["global"] if cfg.local_rope == cfg.rope else rope_cos_sin(cfg.local_rope, positions)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.model.layers):
            cos, sin = tables["local" if layer.local else "global"]
            x, keys[i], values[i] = layer(x, positions, cos, sin, keys[i], values[i])
        x = self.model.norm(x)
        if last_only:
            x = last_valid(x, positions)
        logits = self.lm_head(x) if self.lm_head is not None else self.model.embed_tokens.attend(x)
        if cfg.final_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits, KVCache(tuple(keys), tuple(values), advance(cache.lengths, positions))

    @staticmethod
    def init_cache(cfg: GemmaConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)
