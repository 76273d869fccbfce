"""BERT (``bert``) in MLX: the mirror of mrs/archs/bert.py, on the same config and
checkpoint map (mrs/families/bert.py) and the same parameter names and shapes.

Word + absolute position + token-type embeddings -> LayerNorm, then post-LN layers:
``x = LN(x + attn(x))``, ``x = LN(x + out(act(inter(x))))``. No cache, no generation:
``model(tokens, mask) -> last_hidden_state``; pooling is mrs/backends/mlx/pooling.py's.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mrs.families.bert import MODEL_TYPES, BertConfig  # noqa: F401  (the family's config, re-exported)
from mrs.mlx.layers import Embedding, LayerNorm, Linear, activation, dense_attention


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        D = cfg.hidden_size
        self.word_embeddings = Embedding(cfg.vocab_size, D, dtype=dtype)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, D, dtype=dtype)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, D, dtype=dtype)
        self.LayerNorm = LayerNorm(D, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, tokens: mx.array, token_types: mx.array) -> mx.array:
        positions = mx.arange(tokens.shape[1])[None, :]
        x = self.word_embeddings(tokens) + self.token_type_embeddings(token_types) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        D = cfg.hidden_size
        self.query = Linear(D, D, bias=True, dtype=dtype)
        self.key = Linear(D, D, bias=True, dtype=dtype)
        self.value = Linear(D, D, bias=True, dtype=dtype)
        self.heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, T, _ = x.shape
        q, k, v = (proj(x).reshape(B, T, self.heads, self.head_dim) for proj in (self.query, self.key, self.value))
        return dense_attention(q, k, v, mask, scale=self.head_dim ** -0.5)          # [B, T, D]


class BertResidualOutput(nn.Module):
    """LN(x + dense(h)): the post-LN residual after attention and after the MLP."""

    def __init__(self, d_in: int, d_out: int, eps: float, dtype: Any):
        super().__init__()
        self.dense = Linear(d_in, d_out, bias=True, dtype=dtype)
        self.LayerNorm = LayerNorm(d_out, eps=eps, dtype=dtype)

    def __call__(self, h: mx.array, x: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        # ``self.self``: a child module (a dict key "self" of the mlx.nn.Module), as in the checkpoints.
        self.self = BertSelfAttention(cfg, dtype)
        self.output = BertResidualOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        self.attention = BertAttention(cfg, dtype)
        self.intermediate = BertIntermediate(cfg, dtype)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: Any):
        super().__init__()
        self.layer = [BertLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)]


class BertModel(nn.Module):
    """``model(tokens [B, T], mask [B, T]) -> last_hidden_state [B, T, D]``; mask False = padding."""

    def __init__(self, cfg: BertConfig, dtype: Any = mx.float32):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype)
        self.encoder = BertEncoder(cfg, dtype)

    def __call__(self, tokens: mx.array, mask: mx.array, token_types: mx.array | None = None) -> mx.array:
        if token_types is None:
            token_types = mx.zeros_like(tokens)
        x = self.embeddings(tokens, token_types)
        mask = mask.astype(mx.bool_)                                                  # [B, S]: keys seen
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x
