"""Llama and its close kin as data: the config each backend's model reads, and the
checkpoint map (Llama 2/3/3.1/3.2, Mistral, Granite, Qwen2, Qwen3).

One pre-norm decoder (RMSNorm -> GQA attention with rotary -> RMSNorm -> SwiGLU)
with the few knobs these families turn: rope scaling, a head_dim override, biases,
sliding windows (Mistral; Qwen's per-layer windows), Granite's multipliers and
Qwen3's per-head q/k RMSNorm. Parameter names mirror the HF checkpoints, except that
q/k/v and gate/up are each one tensor with a heads (or parts) axis: ``fused`` says how.
"""

from __future__ import annotations

from dataclasses import dataclass

from mrs.errors import UnsupportedModelError
from mrs.families.common import attention_heads, check_activation, reading_config
from mrs.families.rope import Rope
from mrs.weights import Fused

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
        with reading_config():
            heads, kv_heads, head_dim = attention_heads(config)
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
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
                hidden_act=check_activation(str(config.get("hidden_act", "silu"))),
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


def ignored(name: str) -> bool:
    """Checkpoint tensors that are buffers, not weights."""
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def fused(cfg: LlamaConfig) -> dict[str, Fused]:
    """Checkpoint tensors stacked into one model tensor at load (see ``qkv_fused``)."""
    return {"self_attn.qkv_proj": qkv_fused(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
            "mlp.gate_up_proj": gate_up_fused(cfg.intermediate_size)}


def qkv_fused(heads: int, kv_heads: int, head_dim: int) -> Fused:
    """q/k/v [N*H | K*H | K*H, D] -> qkv_proj [K, G + 2, H, D]: per kv head, its G query
    heads, then its key, then its value. Query head n belongs to kv head n // G (as in
    transformers' repeat_kv), so a slice on K keeps a head group whole and q, k or v
    alone is a slice on the second axis."""
    G = heads // kv_heads
    return Fused(axis=1, parts=(("self_attn.q_proj", (kv_heads, G, head_dim)),
                                ("self_attn.k_proj", (kv_heads, 1, head_dim)),
                                ("self_attn.v_proj", (kv_heads, 1, head_dim))))


def gate_up_fused(hidden: int) -> Fused:
    """gate/up [F, D] each -> gate_up_proj [2, F, D] (gate first)."""
    return Fused(axis=0, parts=(("mlp.gate_proj", (1, hidden)), ("mlp.up_proj", (1, hidden))))
