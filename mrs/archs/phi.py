"""Phi in Flax: Phi-1/1.5/2 (``phi``) and Phi-3/3.5/4-mini (``phi3``).

Phi-1/1.5/2 run attention and MLP in parallel from one LayerNorm
(``x + attn(ln(x)) + mlp(ln(x))``); Phi-3 is a pre-norm RMSNorm decoder like Llama,
with q/k/v and gate/up fused per head and per part as Llama's are. The config and the
checkpoint map (which splits Phi-3's row-stacked tensors) are in mrs/families/phi.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import (
    Embedding,
    GatedMLP,
    LayerNorm,
    Linear,
    RMSNorm,
    activation,
    heads,
    last_valid,
    param,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    run_layers,
    split_qkv,
)
from mrs.cache import KVCache
from mrs.families.phi import MODEL_TYPES, PhiConfig  # noqa: F401  (the family's config, re-exported)

# --- Phi-1/1.5/2 ---------------------------------------------------------------------

class PhiAttention(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(D, N * H, bias=True, dtype=dtype, axes=("heads", "embed"))
        self.k_proj = Linear(D, K * H, bias=True, dtype=dtype, axes=("kv_heads", "embed"))
        self.v_proj = Linear(D, K * H, bias=True, dtype=dtype, axes=("kv_heads", "embed"))
        self.dense = Linear(N * H, D, bias=True, dtype=dtype, axes=("embed", "heads"))
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype, axis="head_dim")
            self.k_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype, axis="head_dim")
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.qk_layernorm = cfg.qk_layernorm

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        norms = (self.q_layernorm, self.k_layernorm) if self.qk_layernorm else (None, None)
        q, k, v = heads(self.q_proj(x), self.heads), heads(self.k_proj(x), self.kv_heads), heads(self.v_proj(x),
                                                                                                 self.kv_heads)
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions, scale=self.head_dim ** -0.5,
            q_norm=norms[0], k_norm=norms[1])
        return self.dense(out), cache_keys, cache_values


class PhiMLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, axes=("mlp", "embed"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, axes=("embed", "mlp"))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nnx.Module):
    """x + attn(ln(x)) + mlp(ln(x)): attention and MLP in parallel from one norm."""

    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = PhiAttention(cfg, dtype)
        self.mlp = PhiMLP(cfg, dtype)

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        h = self.input_layernorm(x)
        attn, cache_keys, cache_values = self.self_attn(h, positions, cos, sin, cache_keys, cache_values)
        return attn + self.mlp(h) + x, cache_keys, cache_values


class PhiBody(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([PhiDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)

    def final_norm(self, x):
        return self.final_layernorm(x)


class TiedHead(nnx.Module):
    """Phi's LM head when its weight is tied to the embeddings: only the bias is its own."""

    def __init__(self, vocab: int, *, dtype: Any):
        self.bias = param((vocab,), dtype, ("vocab",))


# --- Phi-3 / 3.5 / 4-mini --------------------------------------------------------------

class Phi3Attention(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=False, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=False, dtype=dtype, axes=("embed", "heads"))
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.window = cfg.sliding_window

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        q, k, v = split_qkv(self.qkv_proj(x))                                     # [B, T, N|K, H]
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions, scale=self.head_dim ** -0.5, window=self.window)
        return self.o_proj(out), cache_keys, cache_values


class Phi3DecoderLayer(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = Phi3Attention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, bias=False, dtype=dtype)

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        attn, cache_keys, cache_values = self.self_attn(
            self.input_layernorm(x), positions, cos, sin, cache_keys, cache_values)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache_keys, cache_values


class Phi3Body(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([Phi3DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)

    def final_norm(self, x):
        return self.norm(x)


# --- the causal LMs ------------------------------------------------------------------

class PhiForCausalLM(nnx.Module):
    """Phi-1/1.5/2: ``model(tokens, positions, cache) -> (logits, cache)``; positions -1 mark padding."""

    body_cls: type = PhiBody
    head_bias: bool = True

    def __init__(self, cfg: PhiConfig, dtype: Any = jnp.float32):
        self.config = cfg
        self.model = self.body_cls(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=self.head_bias, dtype=dtype,
                                  axes=("vocab", "embed"))
        else:
            self.lm_head = TiedHead(cfg.vocab_size, dtype=dtype) if self.head_bias else None

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, last_only: bool = False):
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        cos, sin = rope_cos_sin(self.config.rope, positions)
        x, cache = run_layers(self.model.layers, x, positions, cos, sin, cache)
        x = self.model.final_norm(x)
        if last_only:
            x = last_valid(x, positions)
        if self.lm_head is None or isinstance(self.lm_head, TiedHead):
            logits = self.model.embed_tokens.attend(x)
            if self.lm_head is not None:
                logits = logits + self.lm_head.bias[...]
        else:                                       # a Linear, or a variant of one
            logits = self.lm_head(x)
        return logits, cache

    @staticmethod
    def init_cache(cfg: PhiConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)


class Phi3ForCausalLM(PhiForCausalLM):
    """Phi-3/3.5/4-mini: the same call and cache as Phi, a Llama-like block inside."""

    body_cls = Phi3Body
    head_bias = False
