"""GGUF files the tests write themselves, with gguf's own writer, from the transformers
fixtures, laid out as llama.cpp's converter (convert_hf_to_gguf.py) lays them out:
llama.cpp tensor names, Q/K rows permuted for the ``llama`` arch, Gemma's norms stored
as 1 + w, Phi-3's longrope factors as tensors, Phi-2's q/k/v fused as old checkpoints
have them and its feed-forward length written as 4 x hidden, Mamba's A as -exp(A_log)
and its conv kernels squeezed, the tokenizer as ``tokenizer.ggml.*`` metadata, and
quantized variants (Q8_0, Q4_0) of every matrix whose rows fill whole blocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# fixture -> llama.cpp architecture
ARCHS = {"llama": "llama", "granite": "granite", "qwen2": "qwen2", "gemma3": "gemma3", "gemma2": "gemma2",
         "gemma": "gemma", "phi3": "phi3", "phi": "phi2", "mamba": "mamba"}


def write_gguf(folder: Path, out: Path, fixture: str, qtype: str = "F32", int8: str | None = None) -> Path:
    """Convert a transformers fixture folder into a GGUF file as llama.cpp's converter would
    (``int8``: store that GGUF tensor as I8, a type no dequantizer handles)."""
    import gguf
    from gguf.quants import quantize

    arch = ARCHS[fixture]
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), arch)
    if arch == "mamba":
        _mamba_metadata(writer, config)
    else:
        _transformer_metadata(writer, config, fixture)
    # The fixture's byte-level BPE, as llama.cpp writes a "gpt2" vocabulary.
    vocab = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    size = next(v for k, v in tensors.items() if k.endswith(("embed_tokens.weight", "embeddings.weight"))).shape[0]
    by_id = {i: t for t, i in {**vocab, **added}.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [3 if tokens[i] in added else (5 if i not in by_id else 1) for i in range(size)]
    if tokenizer["model"]["type"] == "BPE":
        merges = tokenizer["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_string("tokenizer.ggml.pre", "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:       # a word-level vocabulary (the benchmarks' random-weight models): as SentencePiece pieces
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types(types)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

    for name, array in _converted(tensors, config, arch, names):
        if name == int8:
            writer.add_tensor(name, np.round(array * 100).astype(np.int8))
        elif qtype != "F32" and array.ndim == 2 and array.shape[1] % 32 == 0:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    if arch == "phi3" and config["rope_scaling"].get("long_factor"):
        writer.add_tensor("rope_factors_long.weight", np.asarray(config["rope_scaling"]["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(config["rope_scaling"]["short_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _transformer_metadata(writer, config: dict, fixture: str) -> None:
    arch = ARCHS[fixture]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_uint32(f"{arch}.context_length", config.get("max_position_embeddings", 2048))
    writer.add_uint32(f"{arch}.embedding_length", hidden)
    writer.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    # Phi-2's converter writes 4 x hidden, whatever the model's MLP is
    writer.add_uint32(f"{arch}.feed_forward_length", 4 * hidden if arch == "phi2" else config["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    if arch == "phi2":
        writer.add_float32(f"{arch}.attention.layer_norm_epsilon", config["layer_norm_eps"])
    else:
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6))
    if arch in ("phi2", "phi3"):   # these converters write the rotary width, not key_length
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        writer.add_uint32(f"{arch}.rope.dimension_count", int(partial * hidden) // heads)
    else:
        writer.add_uint32(f"{arch}.attention.key_length", head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    if fixture == "gemma3":
        full = rope["full_attention"]
        writer.add_float32(f"{arch}.rope.freq_base", full["rope_theta"])
        writer.add_string(f"{arch}.rope.scaling.type", full["rope_type"])
        writer.add_float32(f"{arch}.rope.scaling.factor", full["factor"])
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
        writer.add_array(f"{arch}.attention.sliding_window_pattern",
                         [t == "sliding_attention" for t in config["layer_types"]])
    elif arch != "phi2":
        writer.add_float32(f"{arch}.rope.freq_base", rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if arch == "phi3":
        original = config["original_max_position_embeddings"]
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        writer.add_uint32(f"{arch}.attention.sliding_window", config.get("sliding_window") or 0)
        scale = config["max_position_embeddings"] / original
        writer.add_float32(f"{arch}.rope.scaling.attn_factor",
                           math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if fixture == "granite":
        for key, name in (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                          ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
            writer.add_float32(f"{arch}.{key}", config[name])
    if fixture == "gemma2":
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
        writer.add_float32(f"{arch}.attn_logit_softcapping", config["attn_logit_softcapping"])
        writer.add_float32(f"{arch}.final_logit_softcapping", config["final_logit_softcapping"])


def _mamba_metadata(writer, config: dict) -> None:
    """MambaModel.set_gguf_parameters: a made-up context and zero heads, as llama.cpp expects."""
    hidden = config["hidden_size"]
    writer.add_uint32("mamba.context_length", 2**20)
    writer.add_uint32("mamba.embedding_length", hidden)
    writer.add_uint32("mamba.feed_forward_length", 0)
    writer.add_uint32("mamba.attention.head_count", 0)
    writer.add_uint32("mamba.block_count", config["num_hidden_layers"])
    writer.add_uint32("mamba.ssm.conv_kernel", config["conv_kernel"])
    writer.add_uint32("mamba.ssm.inner_size", config["expand"] * hidden)
    writer.add_uint32("mamba.ssm.state_size", config["state_size"])
    writer.add_uint32("mamba.ssm.time_step_rank", config["time_step_rank"])
    writer.add_float32("mamba.attention.layer_norm_rms_epsilon", config["layer_norm_epsilon"])
    writer.add_bool("mamba.ssm.dt_b_c_rms", False)


def _converted(tensors: dict, config: dict, arch: str, names) -> list[tuple[str, np.ndarray]]:
    """The checkpoint's tensors under llama.cpp's names, transformed as its converter does."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    out: dict[str, np.ndarray] = {}
    for hf, array in tensors.items():
        module, _, leaf = hf.rpartition(".")
        if module == "lm_head" and config.get("tie_word_embeddings"):
            continue
        bare = module.endswith(".mixer")        # Mamba's A_log and D: a parameter, no .weight
        name = names.get_name(hf) if bare else f"{names.get_name(module)}.{leaf}"
        array = np.asarray(array, np.float32)
        if arch in ("llama", "granite") and module.endswith(("q_proj", "k_proj")) and leaf == "weight":
            array = permute(array, heads if module.endswith("q_proj") else kv_heads)
        if arch.startswith("gemma") and module.endswith("norm") and leaf == "weight":
            array = array + 1.0
        if arch == "mamba" and leaf == "A_log":
            array = -np.exp(array)
        if arch == "mamba" and module.endswith("conv1d") and leaf == "weight":
            array = array.squeeze(1)
        out[name] = array
    if arch == "phi2":                          # old Phi-2 checkpoints: one Wqkv per layer
        for i in range(config["num_hidden_layers"]):
            for leaf in ("weight", "bias"):
                parts = [out.pop(f"blk.{i}.attn_{p}.{leaf}") for p in "qkv"]
                out[f"blk.{i}.attn_qkv.{leaf}"] = np.concatenate(parts, axis=0)
    return list(out.items())


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (LlamaModel.permute), written out here
    independently of mrs.gguf.unpermute so the two check each other."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)
