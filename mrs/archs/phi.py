"""Phi: Phi-1/1.5/2 (``phi``) and Phi-3/3.5/4-mini (``phi3``).

Phi-1/1.5/2 run attention and MLP in parallel from one LayerNorm
(``x + attn(ln(x)) + mlp(ln(x))``), with biases everywhere (the LM head too),
partial rotary (default factor 0.5), gelu_new and optional per-head q/k LayerNorm.
Phi-3 is a pre-norm RMSNorm decoder like Llama, but with fused ``qkv_proj`` and
``gate_up_proj`` (kept fused, as the checkpoint stores them, and split at run time),
longrope scaling (short factors up to ``original_max_position_embeddings``, long
factors past it, chosen per row as transformers does), partial rotary (Phi-4-mini)
and an optional sliding window. Parameter names mirror the HF checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    Rope,
    activation,
    last_valid,
    reading_config,
    rotary_attention,
    run_layers,
    split_qkv,
)
from mrs.cache import KVCache
from mrs.errors import UnsupportedModelError

MODEL_TYPES = ("phi", "phi3")


@dataclass(frozen=True)
class PhiConfig:
    """The subset of a Phi or Phi-3 config.json mrs reads; unknown keys are ignored."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    rope: Rope
    hidden_act: str
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False            # phi only
    sliding_window: int | None = None     # phi3 only

    @classmethod
    def from_hf(cls, config: dict) -> PhiConfig:
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {model_type!r} is not a Phi model")
        phi3 = model_type == "phi3"
        with reading_config():
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            if heads % kv_heads:
                raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of "
                                            f"num_key_value_heads {kv_heads}")
            head_dim = hidden // heads
            # transformers' defaults when config.json leaves these out
            defaults = {"max_position_embeddings": 4096} if phi3 else {"max_position_embeddings": 2048,
                                                                        "partial_rotary_factor": 0.5}
            rope_config = {**defaults, **{k: v for k, v in config.items() if v is not None}}
            nested = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
            if phi3 and "original_max_position_embeddings" not in {**rope_config, **nested}:
                rope_config["original_max_position_embeddings"] = 4096
            if phi3:   # transformers reads Phi-3's old "su" and "yarn" spellings as longrope
                for key in ("rope_scaling", "rope_parameters"):
                    scaling = rope_config.get(key)
                    if isinstance(scaling, dict):
                        for field in ("type", "rope_type"):
                            if scaling.get(field) in ("su", "yarn"):
                                rope_config[key] = scaling = {**scaling, field: "longrope"}
            window = config.get("sliding_window") if phi3 else None
            act = str(config.get("hidden_act", "silu" if phi3 else "gelu_new"))
            activation(act)   # fail at load, not at the first call
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                norm_eps=float(config.get("rms_norm_eps" if phi3 else "layer_norm_eps", 1e-5)),
                max_position_embeddings=int(rope_config["max_position_embeddings"]),
                rope=Rope.from_hf(rope_config, head_dim),
                hidden_act=act,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qk_layernorm=bool(config.get("qk_layernorm", False)) and not phi3,
                sliding_window=int(window) if window else None,
            )


# --- Phi-1/1.5/2 ---------------------------------------------------------------------

class PhiAttention(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(D, N * H, bias=True, dtype=dtype)
        self.k_proj = Linear(D, K * H, bias=True, dtype=dtype)
        self.v_proj = Linear(D, K * H, bias=True, dtype=dtype)
        self.dense = Linear(N * H, D, bias=True, dtype=dtype)
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype)
            self.k_layernorm = LayerNorm(H, eps=cfg.norm_eps, dtype=dtype)
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.qk_layernorm = cfg.qk_layernorm

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        norms = (self.q_layernorm, self.k_layernorm) if self.qk_layernorm else (None, None)
        out, cache_keys, cache_values = rotary_attention(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, cache_keys, cache_values, positions,
            heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, scale=self.head_dim ** -0.5,
            q_norm=norms[0], k_norm=norms[1])
        return self.dense(out), cache_keys, cache_values


class PhiMLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype)
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
        self.bias = nnx.Param(jnp.zeros((vocab,), dtype))


# --- Phi-3 / 3.5 / 4-mini --------------------------------------------------------------

class Phi3Attention(nnx.Module):
    def __init__(self, cfg: PhiConfig, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(D, (N + 2 * K) * H, bias=False, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=False, dtype=dtype)
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.window = cfg.sliding_window

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        N, K, H = self.heads, self.kv_heads, self.head_dim
        q, k, v = split_qkv(self.qkv_proj(x), N, K, H)
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions,
            heads=N, kv_heads=K, head_dim=H, scale=H ** -0.5, window=self.window)
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
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=self.head_bias, dtype=dtype)
        else:
            self.lm_head = TiedHead(cfg.vocab_size, dtype=dtype) if self.head_bias else None

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, last_only: bool = False):
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        cos, sin = self.config.rope.cos_sin(positions)
        x, cache = run_layers(self.model.layers, x, positions, cos, sin, cache)
        x = self.model.final_norm(x)
        if last_only:
            x = last_valid(x, positions)
        if isinstance(self.lm_head, Linear):
            logits = self.lm_head(x)
        else:
            logits = self.model.embed_tokens.attend(x)
            if self.lm_head is not None:
                logits = logits + self.lm_head.bias[...]
        return logits, cache

    @staticmethod
    def init_cache(cfg: PhiConfig, slots: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.init(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)


class Phi3ForCausalLM(PhiForCausalLM):
    """Phi-3/3.5/4-mini: the same call and cache as Phi, a Llama-like block inside."""

    body_cls = Phi3Body
    head_bias = False


def ignored(name: str) -> bool:
    """Checkpoint tensors that are buffers or tied copies, not weights."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"
