"""A GGUF file's metadata as the config.json transformers would write for the model.

llama.cpp's converter (convert_hf_to_gguf.py) writes ``<arch>.<key>`` metadata from
config.json; this module reads it back into the keys each family parses. Where the
converter writes a constant rather than the model's value (Phi-2's feed-forward length
is always 4 x hidden) the tensor shapes say what the model is.
"""

from __future__ import annotations

import math
from typing import Any

from mrs.errors import NotAModelError, UnsupportedModelError

GGUFModel = Any     # mrs.gguf.GGUFModel (not imported: mrs.gguf imports this module)

# GGUF architecture -> the transformers model_type mrs parses it as.
MODEL_TYPES = {"llama": "llama", "granite": "granite", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
               "gemma2": "gemma2", "gemma3": "gemma3_text", "phi2": "phi", "phi3": "phi3", "mamba": "mamba"}
# Granite's multipliers: GGUF key -> config.json key
GRANITE_SCALES = {"attention.scale": "attention_multiplier", "embedding_scale": "embedding_multiplier",
                  "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}


def hf_config(model: GGUFModel) -> dict:
    arch = model.architecture
    if arch not in MODEL_TYPES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    config = _mamba(model) if arch == "mamba" else _transformer(model)
    config |= {"model_type": MODEL_TYPES[arch], "vocab_size": model.vocab_size,
               "tie_word_embeddings": "output.weight" not in model.tensor_infos,
               "bos_token_id": model.field("tokenizer.ggml.bos_token_id"),
               "eos_token_id": model.field("tokenizer.ggml.eos_token_id")}
    return config


def required(model: GGUFModel, key: str) -> Any:
    value = model.arch_field(key)
    if value is None:
        raise NotAModelError(f"GGUF file {model.path.name} lacks the metadata key {model.architecture}.{key}")
    return value


def _rows(model: GGUFModel, tensor: str) -> int | None:
    """A matrix's output rows (GGUF lists extents innermost first)."""
    info = model.tensor_infos.get(tensor)
    return int(info.extents[-1]) if info is not None and len(info.extents) == 2 else None


def _transformer(model: GGUFModel) -> dict:
    arch = model.architecture
    heads = int(required(model, "attention.head_count"))
    hidden = int(required(model, "embedding_length"))
    head_dim = int(model.arch_field("attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": int(required(model, "feed_forward_length")),
        "num_hidden_layers": int(required(model, "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.arch_field("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(model.arch_field("context_length", 2048)),
        "rms_norm_eps": float(model.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(model.arch_field("rope.freq_base", 10000.0)),
    }
    scaling = model.arch_field("rope.scaling.type")
    if scaling and scaling != "none":
        factor = float(model.arch_field("rope.scaling.factor", 1.0))
        config["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        original = model.arch_field("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    window = model.arch_field("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
        if arch in ("qwen2", "qwen3"):
            config["use_sliding_window"] = True
    rotary = model.arch_field("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        config["partial_rotary_factor"] = int(rotary) / head_dim
    if arch == "granite":
        for key, name in GRANITE_SCALES.items():
            if model.arch_field(key) is not None:
                config[name] = float(model.arch_field(key))
    if arch == "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in model.tensor_infos
    if arch in ("gemma", "gemma2", "gemma3"):
        config |= _gemma(model, config)
    if arch == "phi2":
        config |= _phi2(model, config)
    if arch == "phi3":
        config |= _phi3(model, config)
    return config


def _gemma(model: GGUFModel, config: dict) -> dict:
    arch, out = model.architecture, {}
    if arch in ("gemma2", "gemma3"):
        # The file has no query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(head_dim),
        # except for the 27B models (46 and 62 layers), scaled by 1/sqrt(hidden / heads).
        big = config["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
        out["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if big
                                        else config["head_dim"])
    if arch == "gemma2":
        out["attn_logit_softcapping"] = model.arch_field("attn_logit_softcapping", 50.0)
        out["final_logit_softcapping"] = model.arch_field("final_logit_softcapping", 30.0)
    if arch == "gemma3":
        out["final_logit_softcapping"] = model.arch_field("final_logit_softcapping")
        pattern = model.arch_field("attention.sliding_window_pattern")
        if isinstance(pattern, list):       # newer files: one bool per layer (True = sliding)
            out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern:
            out["sliding_window_pattern"] = int(pattern)
    return out


def _phi2(model: GGUFModel, config: dict) -> dict:
    """Phi-1/1.5/2: LayerNorm (not RMS) epsilon, and the MLP width from fc1's rows, since the
    converter writes 4 x hidden whatever the model has."""
    out: dict[str, Any] = {"layer_norm_eps": float(model.arch_field("attention.layer_norm_epsilon", 1e-5)),
                           "partial_rotary_factor": config.get("partial_rotary_factor", 1.0)}
    rows = _rows(model, "blk.0.ffn_up.weight")
    if rows:
        out["intermediate_size"] = rows
    return out


def _phi3(model: GGUFModel, config: dict) -> dict:
    """Phi-3: longrope's per-frequency factors are tensors in the file, the attention factor
    and original context are metadata; a sliding window of 0 means none."""
    out: dict[str, Any] = {"sliding_window": config.get("sliding_window") or None}
    original = model.arch_field("rope.scaling.original_context_length")
    if original:
        out["original_max_position_embeddings"] = int(original)
    if "rope_factors_long.weight" in model.tensor_infos:
        scaling: dict[str, Any] = {"rope_type": "longrope",
                                   "long_factor": model.small_tensor("rope_factors_long.weight").tolist(),
                                   "short_factor": model.small_tensor("rope_factors_short.weight").tolist()}
        attention = model.arch_field("rope.scaling.attn_factor")
        if attention is not None:
            scaling["attention_factor"] = float(attention)
        out["rope_scaling"] = scaling
    return out


def _mamba(model: GGUFModel) -> dict:
    """Mamba-1: no attention (the converter writes head_count 0); d_inner = expand x hidden."""
    if model.arch_field("ssm.dt_b_c_rms"):
        raise UnsupportedModelError("this Mamba GGUF normalizes dt, B and C (Falcon-Mamba), which mrs does not run")
    hidden = int(required(model, "embedding_length"))
    inner = int(required(model, "ssm.inner_size"))
    if inner % hidden:
        raise UnsupportedModelError(f"Mamba inner size {inner} is not a multiple of the hidden size {hidden}")
    return {
        "hidden_size": hidden,
        "expand": inner // hidden,
        "intermediate_size": inner,
        "num_hidden_layers": int(required(model, "block_count")),
        "state_size": int(required(model, "ssm.state_size")),
        "conv_kernel": int(required(model, "ssm.conv_kernel")),
        "time_step_rank": int(model.arch_field("ssm.time_step_rank", math.ceil(hidden / 16))),
        "layer_norm_epsilon": float(model.arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
        "use_bias": "blk.0.ssm_in.bias" in model.tensor_infos,
        "use_conv_bias": "blk.0.ssm_conv1d.bias" in model.tensor_infos,
    }
