"""Phi as data: the config each backend's model reads, and the checkpoint map, for
Phi-1/1.5/2 (``phi``) and Phi-3/3.5/4-mini (``phi3``).

Phi-1/1.5/2 run attention and MLP in parallel from one LayerNorm, with biases
everywhere (the LM head too), partial rotary (default factor 0.5), gelu_new and
optional per-head q/k LayerNorm. Phi-3 is a pre-norm RMSNorm decoder like Llama with
longrope scaling (short factors up to ``original_max_position_embeddings``, long
factors past it, chosen per row as transformers does), partial rotary (Phi-4-mini)
and an optional sliding window. Its checkpoint stores ``qkv_proj`` and ``gate_up_proj``
fused along their rows; ``rename`` splits them so they load into the same per-head
layout as Llama's (``llama.qkv_fused``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mrs.errors import UnsupportedModelError
from mrs.families.common import attention_heads, check_activation, reading_config
from mrs.families.llama import gate_up_fused, qkv_fused
from mrs.families.rope import Rope
from mrs.weights import Fused

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
            heads, kv_heads, head_dim = attention_heads(config, explicit_head_dim=False)
            hidden = int(config["hidden_size"])
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
            check_activation(act)
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


def ignored(name: str) -> bool:
    """Checkpoint tensors that are buffers or tied copies, not weights."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def fused(cfg: PhiConfig) -> dict[str, Fused]:
    """Phi-3's q/k/v and gate/up, per head and per part (Phi-1/1.5/2 keep them apart)."""
    if cfg.model_type != "phi3":
        return {}
    return {"self_attn.qkv_proj": qkv_fused(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
            "mlp.gate_up_proj": gate_up_fused(cfg.intermediate_size)}


def whole(cfg: PhiConfig) -> tuple[str, ...]:
    """The fused tensors Phi-3's checkpoint stores as one module (so PEFT adapts them whole)."""
    return ("self_attn.qkv_proj", "mlp.gate_up_proj") if cfg.model_type == "phi3" else ()


def renamer(cfg: PhiConfig):
    """Phi-3 checkpoints stack q, k, v (and gate, up) along their rows: split them into the
    parts ``fused`` assembles per head."""
    if cfg.model_type != "phi3":
        return None
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def rename(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        module, _, leaf = name.rpartition(".")
        if module.endswith("self_attn.qkv_proj") and array.shape[0] == q_rows + 2 * kv_rows:
            base = module.removesuffix("qkv_proj")
            q, k, v = np.split(array, [q_rows, q_rows + kv_rows], axis=0)
            yield from ((f"{base}{part}.{leaf}", x) for part, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)))
        elif module.endswith("mlp.gate_up_proj") and array.shape[0] == 2 * cfg.intermediate_size:
            base = module.removesuffix("gate_up_proj")
            gate, up = np.split(array, 2, axis=0)
            yield from ((f"{base}gate_proj.{leaf}", gate), (f"{base}up_proj.{leaf}", up))
        else:
            yield name, array

    return rename
