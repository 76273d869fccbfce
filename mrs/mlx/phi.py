"""Phi in MLX: Phi-1/1.5/2 (``phi``) and Phi-3/3.5/4-mini (``phi3``), the mirror of
mrs/archs/phi.py on the same config and checkpoint map (mrs/families/phi.py).

Phi-1/1.5/2 run attention and MLP in parallel from one LayerNorm; Phi-3 is a pre-norm
RMSNorm decoder like Llama, with q/k/v and gate/up fused as Llama's are.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mrs.families.phi import MODEL_TYPES, PhiConfig  # noqa: F401  (re-exported)
from mrs.mlx.cache import KVCache, advance
from mrs.mlx.layers import (
    Embedding,
    GatedMLP,
    LayerNorm,
    Linear,
    RMSNorm,
    StepPositions,
    activation,
    heads,
    last_valid,
    qkv_projection,
    rope_cos_sin,
    rotary_attention,
    split_qkv,
)

# --- Phi-1/1.5/2 ---------------------------------------------------------------------


class PhiAttention(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(D, N * H, bias=True, dtype=dtype)
        self.k_proj = Linear(D, K * H, bias=True, dtype=dtype)
        self.v_proj = Linear(D, K * H, bias=True, dtype=dtype)
        self.dense = Linear(N * H, D, bias=True, dtype=dtype)
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype)
            self.k_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype)
        self.n_heads, self.kv_heads, self.head_dim = N, K, H
        self.qk_layernorm = cfg.qk_layernorm

    def __call__(self, x, at, cos, sin, keys, values):
        norms = (self.q_layernorm, self.k_layernorm) if self.qk_layernorm else (None, None)
        q = heads(self.q_proj(x), self.n_heads)
        k, v = heads(self.k_proj(x), self.kv_heads), heads(self.v_proj(x), self.kv_heads)
        out, keys, values = rotary_attention(q, k, v, cos, sin, keys, values, at, scale=self.head_dim ** -0.5,
                                             q_norm=norms[0], k_norm=norms[1])
        return self.dense(out), keys, values


class PhiMLP(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = PhiAttention(cfg, dtype)
        self.mlp = PhiMLP(cfg, dtype)

    def __call__(self, x, at, cos, sin, keys, values):
        h = self.input_layernorm(x)
        attn, keys, values = self.self_attn(h, at, cos, sin, keys, values)
        return attn + self.mlp(h) + x, keys, values


class PhiBody(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [PhiDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)]
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)

    def final_norm(self, x):
        return self.final_layernorm(x)


class TiedHead(nn.Module):
    """Phi's LM head when tied to the embeddings: only the bias is its own."""

    def __init__(self, vocab: int, *, dtype: Any):
        super().__init__()
        self.bias = mx.zeros((vocab,), dtype)


# --- Phi-3 / 3.5 / 4-mini --------------------------------------------------------------

class Phi3Attention(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = qkv_projection(D, N, K, H, bias=False, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=False, dtype=dtype)
        self.head_dim, self.window = H, cfg.sliding_window

    def __call__(self, x, at, cos, sin, keys, values):
        q, k, v = split_qkv(self.qkv_proj(x))
        out, keys, values = rotary_attention(q, k, v, cos, sin, keys, values, at, scale=self.head_dim ** -0.5,
                                             window=self.window)
        return self.o_proj(out), keys, values


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = Phi3Attention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, bias=False, dtype=dtype)

    def __call__(self, x, at, cos, sin, keys, values):
        attn, keys, values = self.self_attn(self.input_layernorm(x), at, cos, sin, keys, values)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), keys, values


class Phi3Body(nn.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = [Phi3DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)

    def final_norm(self, x):
        return self.norm(x)


# --- the causal LMs ------------------------------------------------------------------

class PhiForCausalLM(nn.Module):
    """Phi-1/1.5/2: ``model(tokens, positions, cache) -> (logits, cache)``."""

    body_cls: type = PhiBody
    head_bias: bool = True

    def __init__(self, cfg: PhiConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.model = self.body_cls(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=self.head_bias, dtype=dtype)
        elif self.head_bias:
            self.lm_head = TiedHead(cfg.vocab_size, dtype=dtype)

    def __call__(self, tokens: mx.array, positions: np.ndarray, cache: KVCache, *, last_only: bool = False):
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        cos, sin = rope_cos_sin(self.config.rope, positions)
        at = StepPositions(positions, cache.max_len)
        for i, layer in enumerate(self.model.layers):
            x, cache.keys[i], cache.values[i] = layer(x, at, cos, sin, cache.keys[i], cache.values[i])
        cache.lengths = advance(cache.lengths, positions)
        x = self.model.final_norm(x)
        if last_only:
            x = last_valid(x, positions)
        head = self.get("lm_head")
        if head is None or isinstance(head, TiedHead):
            logits = self.model.embed_tokens.attend(x)
            if head is not None:
                logits = logits + head.bias
        else:                                       # a Linear, or a variant of one
            logits = head(x)
        return logits, cache

    @staticmethod
    def init_cache(cfg: PhiConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)


class Phi3ForCausalLM(PhiForCausalLM):
    """Phi-3/3.5/4-mini: the same call and cache as Phi, a Llama-like block inside."""

    body_cls = Phi3Body
    head_bias = False
