"""GGUF files the tests write themselves, with gguf's own writer, from the transformers
fixtures, laid out as llama.cpp's converter lays them out: llama.cpp tensor names, Q/K
rows permuted for the ``llama`` arch, Gemma's norms stored as 1 + w, the tokenizer as
``tokenizer.ggml.*`` metadata, and quantized variants (Q8_0, Q4_0) of every matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# fixture -> llama.cpp architecture
ARCHS = {"llama": "llama", "granite": "granite", "qwen2": "qwen2", "gemma3": "gemma3", "gemma2": "gemma2",
         "gemma": "gemma"}


def _hf_names(config: dict) -> list[str]:
    layers = [f"model.layers.{i}.{m}" for i in range(config["num_hidden_layers"]) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
        "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    return ["model.embed_tokens", "model.norm", "lm_head"] + layers


def write_gguf(folder: Path, out: Path, fixture: str, qtype: str = "F32", int8: str | None = None) -> Path:
    """Convert a transformers fixture folder into a GGUF file as llama.cpp's converter would
    (``int8``: store that checkpoint tensor as I8, a type no dequantizer handles)."""
    import gguf
    from gguf.quants import quantize

    arch = ARCHS[fixture]
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    to_gguf = {hf: names.get_name(hf) for hf in _hf_names(config)}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_uint32(f"{arch}.context_length", config.get("max_position_embeddings", 2048))
    writer.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    writer.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    writer.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or {}
    if fixture == "gemma3":
        full = rope["full_attention"]
        writer.add_float32(f"{arch}.rope.freq_base", full["rope_theta"])
        writer.add_string(f"{arch}.rope.scaling.type", full["rope_type"])
        writer.add_float32(f"{arch}.rope.scaling.factor", full["factor"])
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
        writer.add_array(f"{arch}.attention.sliding_window_pattern",
                         [t == "sliding_attention" for t in config["layer_types"]])
    else:
        writer.add_float32(f"{arch}.rope.freq_base", rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if fixture == "granite":
        for key, name in (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                          ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
            writer.add_float32(f"{arch}.{key}", config[name])
    if fixture == "gemma2":
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
        writer.add_float32(f"{arch}.attn_logit_softcapping", config["attn_logit_softcapping"])
        writer.add_float32(f"{arch}.final_logit_softcapping", config["final_logit_softcapping"])

    # The fixture's byte-level BPE, as llama.cpp writes a "gpt2" vocabulary.
    vocab = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    size = tensors["model.embed_tokens.weight"].shape[0]
    by_id = {i: t for t, i in {**vocab, **added}.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [3 if tokens[i] in added else (5 if i not in by_id else 1) for i in range(size)]
    merges = tokenizer["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

    for hf, array in tensors.items():
        module, _, leaf = hf.rpartition(".")
        if module == "lm_head" and config.get("tie_word_embeddings"):
            continue
        name = f"{to_gguf[module]}.{leaf}"
        array = np.asarray(array, np.float32)
        if arch in ("llama", "granite") and module.endswith(("q_proj", "k_proj")) and leaf == "weight":
            array = permute(array, heads if module.endswith("q_proj") else kv_heads)
        if arch.startswith("gemma") and module.endswith("norm") and leaf == "weight":
            array = array + 1.0
        if hf == int8:
            writer.add_tensor(name, np.round(array * 100).astype(np.int8))
        elif qtype != "F32" and array.ndim == 2:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (LlamaModel.permute), written out here
    independently of mrs.gguf.unpermute so the two check each other."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)
