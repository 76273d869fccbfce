"""Gemma as data: the config each backend's model reads, and the checkpoint map, for
Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``).

All three: embeddings scaled by sqrt(hidden) (in the model dtype), RMSNorm with a
``(1 + w)`` weight computed in float32, GeGLU (tanh GELU) MLPs, tied output head.
Gemma 2 adds norms after attention and after the MLP, logit soft-capping (attention and
final) and alternating sliding-window layers; its scale is ``query_pre_attn_scalar``.
Gemma 3 drops the attention soft-cap, adds per-head q/k norms, and runs local (sliding)
and global layers with their own rope bases (5:1 by default), with rope scaling on the
global ones. Both config dialects are read: ``rope_theta`` + ``rope_local_base_freq`` +
``rope_scaling`` (4.x), and ``rope_parameters`` per layer type (transformers 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from mrs.errors import UnsupportedModelError
from mrs.families.common import attention_heads, check_activation, reading_config
from mrs.families.llama import gate_up_fused, qkv_fused
from mrs.families.rope import Rope
from mrs.weights import Fused

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class GemmaConfig:
    """The subset of a Gemma config.json mrs reads; unknown keys are ignored."""

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
    rope: Rope                          # global (full-attention) layers
    local_rope: Rope                    # sliding-window layers (Gemma 3; the same as rope before it)
    hidden_act: str = "gelu_pytorch_tanh"
    scale: float = 1.0                  # query scaling: query_pre_attn_scalar ** -0.5 (head_dim for Gemma 1)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()
    sandwich_norms: bool = False        # Gemma 2/3: norms after attention and after the MLP too
    qk_norm: bool = False               # Gemma 3
    attention_bias: bool = False
    tie_word_embeddings: bool = True

    @property
    def context_length(self) -> int:
        return self.rope.context_length(self.max_position_embeddings)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size ** 0.5

    @classmethod
    def from_hf(cls, config: dict) -> GemmaConfig:
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {model_type!r} is not a Gemma text model "
                                        f"(supported: {', '.join(MODEL_TYPES)})")
        if config.get("use_bidirectional_attention"):
            raise UnsupportedModelError("Gemma with use_bidirectional_attention (an encoder) is not supported")
        with reading_config():
            heads, kv_heads, head_dim = attention_heads(config)
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            act = str(config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
            if act == "gelu":    # the original releases' value, meant as the tanh GELU (transformers agrees)
                act = "gelu_pytorch_tanh"
            check_activation(act)
            types = layer_types(config, model_type, layers)
            window = config.get("sliding_window")
            windows = tuple(int(window) if t == "sliding_attention" and window else None for t in types)
            global_rope, local_rope = ropes(config, model_type, head_dim)
            gemma1 = model_type == "gemma"
            scalar = config.get("query_pre_attn_scalar")
            scale = (head_dim if gemma1 or scalar is None else float(scalar)) ** -0.5
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
                max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
                rope=global_rope,
                local_rope=local_rope,
                hidden_act=act,
                scale=scale,
                attn_softcap=_cap(config, "attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
                final_softcap=_cap(config, "final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
                sliding_windows=windows,
                sandwich_norms=not gemma1,
                qk_norm=model_type == "gemma3_text",
                attention_bias=bool(config.get("attention_bias", False)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            )


def _cap(config: dict, key: str, default: float | None) -> float | None:
    value = config.get(key, default)
    return float(value) if value else None


def layer_types(config: dict, model_type: str, layers: int) -> tuple[str, ...]:
    """Each layer's attention kind, from ``layer_types`` or the family's default pattern."""
    given = config.get("layer_types")
    if given:
        if len(given) != layers or set(given) - set(LAYER_TYPES):
            raise UnsupportedModelError(f"layer_types must list {layers} of {', '.join(LAYER_TYPES)}")
        return tuple(given)
    if model_type == "gemma":
        return ("full_attention",) * layers
    period = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern", 6))
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers))


def ropes(config: dict, model_type: str, head_dim: int) -> tuple[Rope, Rope]:
    """(global rope, local rope): Gemma 3's two bases, in either config dialect."""
    params = config.get("rope_parameters") or {}
    if set(params) & set(LAYER_TYPES):                       # transformers 5, per layer type
        plain = {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_scaling", "layer_types")}
        full = {**plain, "rope_parameters": params.get("full_attention") or {"rope_type": "default"}}
        local = {**plain, "rope_parameters": params.get("sliding_attention") or {"rope_type": "default"}}
        full["rope_parameters"].setdefault("rope_theta", 1_000_000.0)
        local["rope_parameters"].setdefault("rope_theta", 10_000.0)
        return Rope.from_hf(full, head_dim), Rope.from_hf(local, head_dim)
    plain = {k: v for k, v in config.items() if k != "layer_types"}
    if model_type == "gemma3_text":
        plain.setdefault("rope_theta", 1_000_000.0)
        local = {k: v for k, v in plain.items() if k not in ("rope_scaling", "rope_parameters")}
        local["rope_theta"] = float(config.get("rope_local_base_freq", 10_000.0))
        return Rope.from_hf(plain, head_dim), Rope.from_hf(local, head_dim)
    rope = Rope.from_hf(plain, head_dim)
    return rope, rope


def ignored(name: str) -> bool:
    """Checkpoint tensors that are buffers or tied copies, not weights."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def rename(name: str, array):
    """Gemma 3 text checkpoints cut from the multimodal model say ``language_model.model.*``."""
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            yield "model." + name[len(prefix):], array
            return
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")):
        return
    yield name, array


def fused(cfg: GemmaConfig) -> dict[str, Fused]:
    """q/k/v and gate/up stacked at load, per head and per part (as Llama's)."""
    return {"self_attn.qkv_proj": qkv_fused(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
            "mlp.gate_up_proj": gate_up_fused(cfg.intermediate_size)}
