"""BERT (``bert``) as data: the config each backend's encoder reads, and the checkpoint
map. Parameter names mirror the checkpoints sentence-transformers saves (no ``bert.``
prefix); ``rename`` maps the prefixed names of BertFor* checkpoints onto them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mrs.errors import UnsupportedModelError
from mrs.families.common import check_activation, reading_config

MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class BertConfig:
    """The subset of a BERT config.json mrs reads; unknown keys are ignored."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        if config.get("model_type") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {config.get('model_type')!r} is not a BERT model")
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise UnsupportedModelError(f"BERT position_embedding_type {position!r} is not supported (only absolute)")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise UnsupportedModelError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        with reading_config():
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            if hidden % heads:
                raise UnsupportedModelError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            act = str(config.get("hidden_act", "gelu"))
            check_activation(act)
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                hidden_act=act,
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            )


def rename(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Checkpoints of BertFor* heads prefix the encoder with ``bert.``; strip it."""
    yield (name.removeprefix("bert.")), array


def ignored(name: str) -> bool:
    """Checkpoint tensors mrs does not use: buffers, the pooler, task heads."""
    return (name.endswith(("position_ids", "token_type_ids")) or name.startswith(("pooler.", "bert.pooler.", "cls.")))
