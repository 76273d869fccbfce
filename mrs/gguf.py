"""GGUF files (llama.cpp's format, read with its own ``gguf`` package) as mrs models.

A GGUF holds a model's metadata, tokenizer and tensors in one file. This module turns
them into what a Hugging Face folder would have given: a config.json dict each family
parses (``hf_config``, in mrs/gguf_config.py), checkpoint tensors under transformers' names with llama.cpp's
converter transforms undone (``tensors``), and a tokenizer (mrs/gguf_tokenizer.py).
Quantized tensors are dequantized to float32 here, one at a time, with
``gguf.quants``; the backend casts them to its compute dtype as they arrive.

The converter's transforms, checked against transformers' GGUF loader and llama.cpp:
- ``llama`` (Llama, Mistral) and ``granite`` rows of Q and K are permuted for
  llama.cpp's interleaved rotary layout: undone per head;
- Gemma's RMSNorm weights are stored as ``1 + w``: 1 is subtracted again;
- Mamba's ``A_log`` is stored as ``A = -exp(A_log)`` and its conv1d kernels squeezed
  to [channels, kernel]: both undone;
- older Phi-2 checkpoints' fused ``Wqkv`` is split into q, k and v;
- Phi-3's longrope factors are tensors, read into the config;
- a model without ``output.weight`` ties its head to the token embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mrs import gguf_config, gguf_header, quant
from mrs.errors import NotAModelError, UnsupportedModelError, WeightsError
from mrs.quant import QuantFormat

log = logging.getLogger(__name__)

PERMUTED_QK = ("llama", "granite")   # archs whose converter permutes Q/K rows (LlamaModel.permute)
GEMMA_NORMS = ("gemma", "gemma2", "gemma3")
# Tensors llama.cpp writes that transformers recomputes, or reads as config (Phi-3's longrope factors).
DERIVED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# The transformers modules each architecture's tensors come from (the converter's names, mapped back).
_LLAMA_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_LLAMA = (("model.embed_tokens", "model.norm", "lm_head"), _LLAMA_LAYER)
MODULES = {arch: _LLAMA for arch in ("llama", "granite", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")}
MODULES["phi3"] = (("model.embed_tokens", "model.norm", "lm_head"),
                   ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "input_layernorm",
                    "post_attention_layernorm"))
MODULES["phi2"] = (("model.embed_tokens", "model.final_layernorm", "lm_head"),
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj",
                    "self_attn.dense", "mlp.fc1", "mlp.fc2", "input_layernorm"))
MODULES["mamba"] = (("backbone.embeddings", "backbone.norm_f", "lm_head"),
                    ("norm", "mixer.in_proj", "mixer.conv1d", "mixer.x_proj", "mixer.dt_proj", "mixer.A_log",
                     "mixer.D", "mixer.out_proj"))


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic (the suffix alone could lie)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == gguf_header.MAGIC
    except OSError:
        return False


@dataclass
class GGUFModel:
    """One opened GGUF file: metadata, tensors, and what mrs needs of them."""

    path: Path

    @cached_property
    def header(self) -> gguf_header.Header:
        return gguf_header.read(self.path)

    def field(self, key: str, default: Any = None) -> Any:
        """One metadata value as a Python scalar, string or list."""
        return self.header.fields.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.field("general.architecture")
        if not isinstance(arch, str):
            raise NotAModelError(f"GGUF file {self.path.name} names no general.architecture")
        return arch

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    @property
    def tensor_infos(self) -> dict[str, gguf_header.TensorInfo]:
        return self.header.tensors

    # --- config ---------------------------------------------------------------------

    def hf_config(self) -> dict:
        """The config.json transformers would write for this model (what the families read)."""
        return gguf_config.hf_config(self)

    def small_tensor(self, name: str) -> np.ndarray:
        """One tensor read whole, as float32 (metadata kept as tensors: rope factors)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensor_infos[name]
        raw = gguf_header.tensor_bytes(self.header, info, self.path.name)
        return np.asarray(dequantize(raw, GGMLQuantizationType(info.type)), np.float32).reshape(info.shape)

    @property
    def vocab_size(self) -> int:
        infos = self.tensor_infos
        if "token_embd.weight" in infos:
            return int(infos["token_embd.weight"].shape[0])
        return len(self.field("tokenizer.ggml.tokens") or [])

    # --- tensors --------------------------------------------------------------------

    def name_map(self, layers: int) -> dict[str, str]:
        """GGUF tensor base name -> transformers module name, for the names this arch uses."""
        import gguf

        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.architecture), None)
        if arch is None or self.architecture not in MODULES:
            raise UnsupportedModelError(f"mrs reads no tensors of GGUF architecture {self.architecture!r}")
        names = gguf.get_tensor_name_map(arch, layers)
        top, per_layer = MODULES[self.architecture]
        prefix = "backbone" if self.architecture == "mamba" else "model"
        candidates = list(top) + [f"{prefix}.layers.{i}.{m}" for i in range(layers) for m in per_layer]
        out: dict[str, str] = {}
        for hf in candidates:
            base = names.get_name(hf)
            if base is not None:
                out.setdefault(base, hf)
        return out

    def _place(self, name: str, names: dict[str, str]) -> tuple[str, str, str]:
        """(GGUF base name, leaf, transformers name) of one tensor."""
        if name in names:               # Mamba's ssm_a and ssm_d: a parameter, no .weight
            return name, "", names[name]
        base, _, leaf = name.rpartition(".")
        if base not in names:
            raise UnsupportedModelError(
                f"GGUF tensor {name} of a {self.architecture} model has no place in mrs's model")
        return base, leaf, f"{names[base]}.{leaf}"

    def tensor_formats(self, layers: int) -> dict[str, QuantFormat | None]:
        """{transformers module: the lossless quantized format of its weight, or None (dense)},
        from the header alone."""
        from gguf import GGMLQuantizationType

        names = self.name_map(layers)
        out: dict[str, QuantFormat | None] = {}
        for name, info in self.tensor_infos.items():
            if name in DERIVED or not name.endswith(".weight"):
                continue
            _, _, hf_name = self._place(name, names)
            module = hf_name.removesuffix(".weight")
            kind = GGMLQuantizationType(info.type).name
            fmt = quant.GGUF_FORMATS.get(kind) if len(info.extents) == 2 else None
            for part in _split_parts(self.architecture, module):
                out[part] = fmt
        return out

    def tensors(self, layers: int, heads: int = 0, kv_heads: int = 0,
                quantized: Mapping[str, QuantFormat] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(transformers name, array) for every tensor, converter transforms undone: float32,
        or, for a weight whose transformers module is in ``quantized``, its packed
        ``weight``/``scales``/``biases`` in that module's format (mrs/quant.py)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        arch = self.architecture
        names = self.name_map(layers)
        quantized = quantized or {}
        for name, info in self.tensor_infos.items():
            if name in DERIVED:
                continue
            base, leaf, hf_name = self._place(name, names)
            kind = GGMLQuantizationType(info.type).name
            module = hf_name.removesuffix(".weight")
            targets = {quantized.get(part) for part in _split_parts(arch, module)}
            fmt = targets.pop() if leaf == "weight" and len(targets) == 1 else None
            try:
                raw = gguf_header.tensor_bytes(self.header, info, self.path.name)   # checks the type is known
                if fmt is not None:
                    packed = quant.from_gguf(raw, kind, info.shape).packed(fmt)
                    for part, array in packed.items():
                        lead = info.shape[:-1] + array.shape[-1:]
                        yield from undo_converter(arch, base, part, f"{module}.{part}", array.reshape(lead),
                                                  heads, kv_heads)
                    continue
                array = dequantize(raw, GGMLQuantizationType(info.type))
            except NotImplementedError as e:
                raise UnsupportedModelError(
                    f"GGUF tensor {name} has type {kind}, which mrs cannot dequantize ({e})") from e
            except (ValueError, IndexError) as e:
                raise WeightsError(f"GGUF tensor {name} is truncated or corrupt: {e}") from e
            shape = info.shape
            try:
                array = np.asarray(array, np.float32).reshape(shape)
            except ValueError as e:
                raise WeightsError(f"GGUF tensor {name} holds {array.size} values, not the {shape} it declares") from e
            yield from undo_converter(arch, base, leaf, hf_name, array, heads, kv_heads)


def _split_parts(arch: str, module: str) -> list[str]:
    """The transformers modules one GGUF tensor becomes (older Phi-2's fused Wqkv: three)."""
    if arch == "phi2" and module.endswith("self_attn.qkv_proj"):
        stem = module.removesuffix("qkv_proj")
        return [f"{stem}{p}" for p in ("q_proj", "k_proj", "v_proj")]
    return [module]


def undo_converter(arch: str, base: str, leaf: str, hf_name: str, array: np.ndarray, heads: int,
                   kv_heads: int) -> Iterator[tuple[str, np.ndarray]]:
    """One GGUF tensor back in transformers' layout (see the module docstring). A quantized
    weight's three arrays share its rows, so row transforms apply to each alike."""
    rows = leaf in quant.LEAVES
    if arch in PERMUTED_QK and base.endswith(("attn_q", "attn_k")) and rows:
        array = unpermute(array, heads if base.endswith("attn_q") else kv_heads)
    elif arch in GEMMA_NORMS and base.endswith("norm") and leaf == "weight":
        array = array - 1.0
    elif arch == "mamba" and base.endswith("ssm_a"):
        with np.errstate(divide="ignore", invalid="ignore"):
            array = np.log(-array)          # the converter stores A = -exp(A_log)
    elif arch == "mamba" and base.endswith("ssm_conv1d") and leaf == "weight":
        array = array[:, None, :]           # the converter squeezed Conv1d's [channels, 1, kernel]
    elif arch == "phi2" and base.endswith("attn_qkv"):
        # Older Phi-2 checkpoints fuse q, k and v (Wqkv); heads == kv heads, so thirds.
        module = hf_name.removesuffix(f".{leaf}").removesuffix("qkv_proj")
        for part, x in zip(("q_proj", "k_proj", "v_proj"), np.split(array, 3, axis=0), strict=True):
            yield f"{module}{part}.{leaf}", x
        return
    yield hf_name, array


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: per head, rows (pairs, half) back to (half, pairs)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


class GGUFTensors:
    """A GGUF file's tensors as a checkpoint stream for ``weights.load_params``; the
    modules of ``quantized`` (transformers module -> format) arrive packed."""

    def __init__(self, model: GGUFModel, config: Any, quantized: Mapping[str, QuantFormat] | None = None):
        self.model, self.config, self.quantized = model, config, dict(quantized or {})

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        c = self.config
        return self.model.tensors(c.num_hidden_layers, getattr(c, "num_attention_heads", 0),
                                  getattr(c, "num_key_value_heads", 0), self.quantized)

    def __str__(self) -> str:
        return str(self.model.path)


def tokenizer_fields(model: GGUFModel) -> dict[str, Any]:
    """Every ``tokenizer.*`` metadata value of the file."""
    return {key: value for key, value in model.header.fields.items() if key.startswith("tokenizer.")}


def tokenizer(model: GGUFModel) -> Any:
    """The file's tokenizer as an mrs Tokenizer (chat template and special tokens included)."""
    from mrs import gguf_tokenizer
    from mrs.tokenizer import Tokenizer

    meta = tokenizer_fields(model)
    hf = _built_tokenizer(model, meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def text(key: str) -> str | None:
        index = meta.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config = {"bos_token": text("tokenizer.ggml.bos_token_id"), "eos_token": text("tokenizer.ggml.eos_token_id"),
              "chat_template": meta.get("tokenizer.chat_template")}
    return Tokenizer.from_parts(hf, config)


def _built_tokenizer(model: GGUFModel, meta: dict[str, Any]) -> Any:
    """gguf_tokenizer.build, kept in the compile cache: rebuilding a 262K-piece vocabulary's
    merges takes seconds (2.9 s for Gemma 3 on a 2-core CPU), reading the result back a
    fraction of that. Keyed by the file (path, size, mtime), the builder's source and the
    tokenizers version; an entry that does not parse is rebuilt."""
    import hashlib

    import tokenizers

    from mrs import compile_cache, gguf_tokenizer
    from mrs.config import Settings

    base = Settings.load().compile_cache_dir
    entry = None
    if base is not None:
        stat = model.path.stat()
        key = hashlib.sha256(b"\0".join((
            str(model.path.resolve()).encode(), str(stat.st_size).encode(), str(stat.st_mtime_ns).encode(),
            Path(gguf_tokenizer.__file__).read_bytes()))).hexdigest()
        entry = compile_cache.version_folder(base, tokenizers=tokenizers.__version__) / f"{key}.json"
        text = compile_cache.read_text(entry)
        if text is not None:
            try:
                return tokenizers.Tokenizer.from_str(text)
            except Exception:   # tokenizers raises a bare Exception on a bad file: rebuild it
                log.warning("ignoring a damaged cached tokenizer %s", entry)
    hf = gguf_tokenizer.build(model.architecture, meta)
    if entry is not None:
        compile_cache.write_atomic(entry, hf.to_str().encode())
    return hf


def summary(path: Path) -> dict:
    """What `list`, `show` and /api/tags report of a GGUF file, from its header alone; kept
    per (file, size, mtime), since a vocabulary's header takes a while to read and /api/tags
    asks on every call."""
    path = Path(path).resolve()
    stat = path.stat()
    return dict(_summary(path, stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=256)
def _summary(path: Path, size: int, mtime_ns: int) -> dict:
    import hashlib

    from gguf import LlamaFileType

    model = GGUFModel(path)
    stat = model.path.stat()
    arch = model.architecture
    parameters = sum(t.n_elements for t in model.tensor_infos.values())
    file_type = model.field("general.file_type")
    try:
        dtype = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        dtype = f"file_type {file_type}"
    if dtype is None:   # no general.file_type: the type most matrices have
        from collections import Counter

        from gguf import GGMLQuantizationType

        kinds = Counter(t.type for t in model.tensor_infos.values() if len(t.extents) >= 2)
        dtype = GGMLQuantizationType(kinds.most_common(1)[0][0]).name if kinds else "unknown"
    stem = model.path.name
    digest = stem.replace("-", ":", 1) if stem.startswith("sha256-") else "sha256:" + hashlib.sha256(
        f"{model.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return {
        "name": model.path.stem, "path": str(model.path), "architecture": arch,
        "model_type": gguf_config.MODEL_TYPES.get(arch, arch), "family": arch, "parameters": parameters,
        "dtype": dtype, "size_bytes": stat.st_size, "modified": stat.st_mtime,
        "context_length": model.arch_field("context_length"),
        "embedding_length": model.arch_field("embedding_length"),
        "chat_template": model.field("tokenizer.chat_template") is not None,
        "files": [model.path.name], "digest": digest, "format": "gguf",
    }
