"""Llama and its close kin: Llama 2/3/3.1/3.2, Mistral, Granite, Qwen2, Qwen3.

One pre-norm decoder (RMSNorm -> GQA attention with rotary -> RMSNorm -> SwiGLU)
with the few knobs these families turn: rope scaling, a head_dim override, biases,
sliding windows (Mistral; Qwen's per-layer windows), Granite's multipliers and
Qwen3's per-head q/k RMSNorm. Parameter names mirror the HF checkpoints, except
that q/k/v and gate/up are each one matrix (``fused`` is the key map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import Embedding, GatedMLP, Linear, RMSNorm, Rope, last_valid, rotary_attention, split_qkv
from mrs.cache import KVCache, advance
from mrs.errors import UnsupportedModelError

MODEL_TYPES = ("llama", "mistral", "granite", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of a HF config.json this decoder reads; unknown keys are ignored."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: Rope
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant for; dynamic NTK rope stretches it by its factor."""
        return self.rope.context_length(self.max_position_embeddings)

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {model_type!r} is not a Llama-family model")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            kv_heads = int(config.get("num_key_value_heads") or heads)
            if heads % kv_heads:
                raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of "
                                            f"num_key_value_heads {kv_heads}")
            attention_bias = bool(config.get("attention_bias", False))
            qwen2 = model_type == "qwen2"
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                rope=Rope.from_hf(config, head_dim),
                hidden_act=config.get("hidden_act", "silu"),
                qkv_bias=attention_bias or qwen2,
                o_bias=attention_bias and not qwen2,
                mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                sliding_windows=sliding_windows(config, model_type, layers),
                embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(config.get("residual_multiplier", 1.0)),
                attention_multiplier=(float(config["attention_multiplier"])
                                      if config.get("attention_multiplier") is not None else None),
                logits_scaling=float(config.get("logits_scaling", 1.0)),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks required key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise UnsupportedModelError(f"config.json has an invalid value: {e}") from e


def sliding_windows(config: dict, model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window (None = full), from ``layer_types`` or the older flags."""
    window = config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * layers
    types = config.get("layer_types")
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    first = int(config.get("max_window_layers", 0)) if model_type in ("qwen2", "qwen3") else 0
    return tuple(int(window) if i >= first else None for i in range(layers))


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(D, (N + 2 * K) * H, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, dtype=dtype)
        self.heads, self.kv_heads, self.head_dim = N, K, H
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else H ** -0.5
        self.window = cfg.sliding_windows[layer]
        self.qk_norm = cfg.qk_norm

    def __call__(self, x, positions, cos, sin, cache_keys, cache_values):
        q, k, v = split_qkv(self.qkv_proj(x), self.heads, self.kv_heads, self.head_dim)
        out, cache_keys, cache_values = rotary_attention(
            q, k, v, cos, sin, cache_keys, cache_values, positions,
            heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, scale=self.scale, window=self.window,
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
                                                                   dtype=dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, last_only: bool = False):
        cfg = self.config
        x = self.model.embed_tokens(tokens)                                          # [B, T, D]
        if cfg.embedding_multiplier != 1.0:
            x = x * jnp.asarray(cfg.embedding_multiplier, x.dtype)
        cos, sin = cfg.rope.cos_sin(positions)
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


def ignored(name: str) -> bool:
    """Checkpoint tensors that are buffers, not weights."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def fused(cfg: LlamaConfig) -> dict[str, list[tuple[str, int]]]:
    """Checkpoint tensors stacked into one model tensor at load, with their row counts."""
    N, K, H, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    return {"self_attn.qkv_proj": [("self_attn.q_proj", N * H), ("self_attn.k_proj", K * H),
                                   ("self_attn.v_proj", K * H)],
            "mlp.gate_up_proj": [("mlp.gate_proj", F), ("mlp.up_proj", F)]}
