"""BERT (``bert``): the bidirectional encoder behind sentence embeddings.

Word + absolute position + token-type embeddings -> LayerNorm, then post-LN layers:
``x = LN(x + attn(x))``, ``x = LN(x + out(act(inter(x))))``. There is no cache and
no generation: ``model(tokens, mask) -> last_hidden_state``; pooling into one vector
per text (sentence-transformers' mean/cls/... and Normalize) is mrs/embedding.py's job.
Parameter names mirror the checkpoints sentence-transformers saves (no ``bert.``
prefix); ``rename`` maps the prefixed names of BertFor* checkpoints onto them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrs.archs.layers import (
    Embedding,
    LayerNorm,
    Linear,
    activation,
    dense_attention,
)
from mrs.families.bert import MODEL_TYPES, BertConfig  # noqa: F401  (the family's config, re-exported)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        D = cfg.hidden_size
        self.word_embeddings = Embedding(cfg.vocab_size, D, dtype=dtype)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, D, dtype=dtype, axes=("positions", "embed"))
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, D, dtype=dtype, axes=("token_types", "embed"))
        self.LayerNorm = LayerNorm(D, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, tokens, token_types):
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = self.word_embeddings(tokens) + self.token_type_embeddings(token_types) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        D = cfg.hidden_size
        self.query = Linear(D, D, bias=True, dtype=dtype, axes=("heads", "embed"))
        self.key = Linear(D, D, bias=True, dtype=dtype, axes=("heads", "embed"))
        self.value = Linear(D, D, bias=True, dtype=dtype, axes=("heads", "embed"))
        self.heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads

    def __call__(self, x, mask):
        B, T, _ = x.shape
        q, k, v = (proj(x).reshape(B, T, self.heads, self.head_dim) for proj in (self.query, self.key, self.value))
        return dense_attention(q, k, v, mask, scale=self.head_dim ** -0.5)          # [B, T, D]


class BertResidualOutput(nnx.Module):
    """LN(x + dense(h)): the post-LN residual after attention and after the MLP."""

    def __init__(self, d_in: int, d_out: int, eps: float, dtype: Any, in_axis: str):
        self.dense = Linear(d_in, d_out, bias=True, dtype=dtype, axes=("embed", in_axis))
        self.LayerNorm = LayerNorm(d_out, eps=eps, dtype=dtype)

    def __call__(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        self.self = BertSelfAttention(cfg, dtype)
        self.output = BertResidualOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, dtype, "heads")

    def __call__(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, axes=("mlp", "embed"))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        self.attention = BertAttention(cfg, dtype)
        self.intermediate = BertIntermediate(cfg, dtype)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, dtype, "mlp")

    def __call__(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        self.layer = nnx.List([BertLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])


class BertModel(nnx.Module):
    """``model(tokens [B, T], mask [B, T]) -> last_hidden_state [B, T, D]``; mask False = padding."""

    def __init__(self, cfg: BertConfig, dtype: Any = jnp.float32):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype)
        self.encoder = BertEncoder(cfg, dtype)

    def __call__(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array | None = None) -> jax.Array:
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        x = self.embeddings(tokens, token_types)
        keys = jnp.broadcast_to(mask[:, None, :].astype(bool), (mask.shape[0], tokens.shape[1], mask.shape[1]))
        for layer in self.encoder.layer:
            x = layer(x, keys)
        return x
