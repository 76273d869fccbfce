"""Mamba-1 (``mamba``) as data: the config each backend's model reads, and the
checkpoint map. The model itself (a state-space model with no attention and no KV
cache) is in each backend's ``archs`` (mrs/archs/mamba.py for JAX).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mrs.errors import UnsupportedModelError
from mrs.families.common import check_activation, reading_config

MODEL_TYPES = ("mamba",)


@dataclass(frozen=True)
class MambaConfig:
    """The subset of a Mamba config.json mrs reads; unknown keys are ignored."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    state_size: int
    num_hidden_layers: int
    conv_kernel: int
    time_step_rank: int
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, config: dict) -> MambaConfig:
        if config.get("model_type") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {config.get('model_type')!r} is not a Mamba-1 model")
        with reading_config():
            hidden = int(config["hidden_size"])
            rank = config.get("time_step_rank", "auto")
            kernel = int(config.get("conv_kernel", 4))
            if kernel < 2:
                raise UnsupportedModelError(f"conv_kernel {kernel} must be at least 2")
            act = str(config.get("hidden_act", "silu"))
            check_activation(act)
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                # transformers derives it from expand and ignores a stored intermediate_size
                intermediate_size=int(config.get("expand", 2) * hidden),
                state_size=int(config.get("state_size", 16)),
                num_hidden_layers=int(config["num_hidden_layers"]),
                conv_kernel=kernel,
                time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
                layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
                use_bias=bool(config.get("use_bias", False)),
                use_conv_bias=bool(config.get("use_conv_bias", True)),
                hidden_act=act,
                residual_in_fp32=bool(config.get("residual_in_fp32", True)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            )


# LoRA's default targets: the projections PEFT adapts on Mamba as mrs does. PEFT refuses
# out_proj, and transformers reads dt_proj's weight directly (so PEFT's dt_proj factors do
# nothing there). mrs adapts both when named: such an adapter runs in mrs and merges with
# `mrs merge`, but PEFT on transformers would not apply it.
LORA_TARGETS = ("in_proj", "x_proj")


def rename(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Older checkpoints call the embeddings ``backbone.embedding``; transformers renames them too."""
    yield name.replace("backbone.embedding.", "backbone.embeddings."), array


def ignored(name: str) -> bool:
    """Checkpoint tensors that are tied copies, not weights."""
    return name == "lm_head.weight"
