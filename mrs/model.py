"""A loaded model: where it came from, its family and config, its tokenizer, and the
backend runner that holds its weights and steps (mrs/backends).

Backend-free: ``load()`` resolves the folder, parses config.json into the family's
config, and hands the arrays to the backend the device names (JAX unless another
backend claims it). Everything above (the engine, the server, the CLI) talks to a
``Model`` and, through ``model.runner``, to the backend protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mrs import backends, families, store
from mrs.errors import ContextLengthError, InvalidParameterError, ModelNotFoundError, MrsError
from mrs.families import Family
from mrs.store import read_json
from mrs.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Model:
    """A model ready to run: metadata here, arrays in ``runner`` (a backend's Runner)."""

    def __init__(self, path: Path, hf_config: dict, family: Family, config: Any, runner: Any,
                 tokenizer: Tokenizer | None, load_seconds: float = 0.0, name: str | None = None,
                 default_options: dict | None = None, default_system: str | None = None):
        self.path, self.hf_config, self.family, self.config = Path(path), hf_config, family, config
        self.runner, self.tokenizer, self.load_seconds = runner, tokenizer, load_seconds
        self.name = name or (self.path.stem if self.path.is_file() else self.path.name).replace(store.SEPARATOR, "/", 1)
        # What the model's packaging asks for when a request does not say (Ollama's params and system layers)
        self.default_options = dict(default_options or {})
        self.default_system = default_system
        gen_path = self.path / "generation_config.json"
        self.generation_config = read_json(gen_path) if gen_path.is_file() else {}
        self.eos_ids = self._eos_ids()
        self.adapter: Path | None = None        # the LoRA adapter merged in at load, if any

    @property
    def context_length(self) -> int:
        length = getattr(self.config, "context_length", None) or getattr(self.config, "max_position_embeddings", 0)
        return int(length or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def num_params(self) -> int:
        return self.runner.num_params

    @property
    def dtype_name(self) -> str:
        return self.runner.dtype_name

    @property
    def quantization(self) -> dict[str, int]:
        """{format: projections in it}: empty for a dense model (see mrs/quant.py)."""
        return dict(getattr(self.runner, "quantization", {}) or {})

    @property
    def steps(self):
        """The compiled steps without top alternatives (see ``Runner.steps``)."""
        return self.runner.steps(0)

    def init_cache(self, slots: int, max_len: int) -> Any:
        """Fresh per-slot state (KV or SSM) for ``slots`` rows of up to ``max_len`` tokens."""
        return self.runner.new_cache(slots, max_len)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"), self.hf_config.get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source if isinstance(i, int))
        if self.tokenizer is not None and self.tokenizer.eos_token:
            eos = self.tokenizer.token_id(self.tokenizer.eos_token)
            if eos is not None:
                ids.add(eos)
        return frozenset(ids)

    def logits(self, token_ids) -> np.ndarray:
        """Full-sequence logits [batch, seq, vocab] float32 for token ids [seq] or [batch, seq]."""
        if self.family.kind != "causal":
            raise MrsError(f"model {self.name} is an {self.family.kind}: it has no next-token logits; use mrs.embed()")
        ids = np.asarray(token_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidParameterError("token_ids", f"array of shape {ids.shape}",
                                        "a non-empty list of ints or a [batch, seq] int array")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidParameterError("token_ids", "out-of-range id", f"ids in [0, {self.vocab_size})")
        if ids.shape[1] > self.context_length:
            raise ContextLengthError(f"{ids.shape[1]} tokens exceed the model's context of {self.context_length}")
        return self.runner.logits(ids.astype(np.int32))

    def __repr__(self) -> str:
        quantized = f" quantized {', '.join(self.quantization)}" if self.quantization else ""
        return (f"<mrs.Model {self.name} {self.hf_config.get('model_type')} {self.num_params:,} params "
                f"{self.dtype_name}{quantized} on {self.runner.backend}>")


QUANTIZE = {"int8": 8, "int4": 4}


class _Stream:
    """A re-iterable checkpoint stream that names its folder in errors."""

    def __init__(self, make: Any, path: Path):
        self.make, self.path = make, path

    def __iter__(self):
        return iter(self.make())

    def __str__(self) -> str:
        return str(self.path)


def _runs_quantized(backend: Any, device: str | None) -> bool:
    """Whether the backend runs quantized weights on this device (it says why not, once)."""
    kernel = getattr(backend, "quantized_kernel", None)
    return kernel is not None and kernel(device) is not None


def _runnable(backend: Any, formats: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's formats, with those the backend's kernels lack set to None: mrs.load
    reads those tensors dequantized (and a fused tensor with such a part stays dense)."""
    runs = getattr(backend, "runs_format", None)
    if runs is None:
        return dict(formats)
    return {module: fmt if fmt is None or runs(fmt) else None for module, fmt in formats.items()}


def quantize_format(quantize: Any) -> Any:
    """``"int8"`` / ``"int4"`` (or a mrs.quant.QuantFormat) -> the format dense weights take at load."""
    from mrs.quant import QuantFormat

    if quantize is None or isinstance(quantize, QuantFormat):
        return quantize
    if quantize not in QUANTIZE:
        raise InvalidParameterError("quantize", quantize, f"one of {', '.join(QUANTIZE)}")
    return QuantFormat(QUANTIZE[quantize], 64)


def _dense_where_adapted(formats: Mapping[str, Any], adapter: Any) -> dict[str, Any]:
    """The plan's formats with the modules an adapter changes read dense (it merges into them)."""
    if adapter is None:
        return dict(formats)
    return {module: None if module in adapter.weights else fmt for module, fmt in formats.items()}


def _with_adapter(stream: Any, path: Path, adapter: Any, rename: Any) -> Any:
    """The checkpoint stream with the adapter merged into it (or the stream itself)."""
    if adapter is None:
        return stream
    from mrs import adapters, weights

    source = stream if stream is not None else _Stream(lambda: weights.iter_tensors(path), path)
    return _Stream(lambda: adapters.merged(source, adapter, rename), path)


def load(ref: str | Path, dtype: str | None = None, device: str | None = None, home: Path | None = None, *,
         quantize: Any = None, dequantize: bool = False, adapter: str | Path | None = None,
         tensor_parallel: int = 1, **backend_options: Any) -> Model:
    """Load a model from a folder path, a .gguf file, an ``org/model`` name in the models directory,
    or a ``name[:tag]`` of Ollama's store (read-only; its default options and system prompt come along).

    A GGUF file's quantized tensors stay quantized (mrs/quant.py), run by the fastest
    kernel the device has, unless ``dequantize`` (or the CPU kernel cannot be built:
    then they are dequantized, with one warning). ``quantize="int8"|"int4"`` quantizes a
    dense model's projections as they load (8 or 4 bits, groups of 64 inputs).
    ``adapter`` is a LoRA adapter folder (PEFT's format, e.g. from ``mrs finetune``): it is
    merged into the weights as they load, so the model runs at the base's speed; the
    modules it changes are read dense (a quantized file's too), and ``quantize=``
    quantizes them after the merge.
    ``tensor_parallel=N`` splits the model over N devices of the platform (heads, MLP
    columns, vocabulary, Mamba channels; mrs/shard.py): for a model larger than one device.
    ``backend_options`` go to the backend's loader (for JAX: ``variant``, a projection
    variant chosen per parameter path; see ``mrs.archs.layers.swap_linears``)."""
    started = time.perf_counter()
    if home is None or dtype is None or device is None:
        from mrs.config import Settings

        settings = Settings.load()
        home = home or settings.home
        dtype = dtype or settings.dtype
        device = device or settings.device
    name = options = system = None
    try:
        path = store.resolve(ref, home)
        if path.is_file() and isinstance(ref, str) and not store.looks_like_path(ref):
            name = ref                      # a pulled GGUF quant: keep the name it was pulled as
    except ModelNotFoundError:
        from mrs import ollama_store

        found = ollama_store.find(str(ref)) if isinstance(ref, str) else None
        if found is None:
            raise
        path, name, options, system = found.gguf, found.name, found.options, found.system
    backend = backends.for_device(device)
    if tensor_parallel != 1:
        if not getattr(backend, "TENSOR_PARALLEL", False):
            raise MrsError(f"tensor_parallel={tensor_parallel!r}: the {backend.NAME} backend runs a model on one "
                           "device only")
        backend_options["tensor_parallel"] = tensor_parallel
    lora = None
    if adapter is not None:
        from mrs import adapters

        lora = adapters.read(adapter)
    fmt = quantize_format(quantize)
    if fmt is not None:
        backend_options["quantize"] = fmt
    if path.is_file():                     # a GGUF file: metadata, tensors and tokenizer in one
        from mrs import gguf, quant

        source = gguf.GGUFModel(path)
        hf_config = source.hf_config()
        family, config = families.resolve(hf_config)
        tokenizer = gguf.tokenizer(source)
        by_checkpoint: dict = {}            # checkpoint module -> the format its model tensor takes
        if not dequantize and _runs_quantized(backend, device):
            backend_options["quantized"], by_checkpoint = quant.plan(
                _dense_where_adapted(_runnable(backend, source.tensor_formats(config.num_hidden_layers)), lora),
                family.checkpoint_map(config).fused)
        backend_options["checkpoint"] = _with_adapter(gguf.GGUFTensors(source, config, by_checkpoint), path, lora,
                                                      family.checkpoint_map(config).rename)
    else:
        from mrs import quant, quant_checkpoint, weights

        hf_config = read_json(path / "config.json")
        family, config = families.resolve(hf_config)
        tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
        if quant_checkpoint.quantization(hf_config) is not None:     # an MLX-layout quantized checkpoint
            stored = quant_checkpoint.formats(path, hf_config)
            by_checkpoint = {}
            if not dequantize and _runs_quantized(backend, device):
                backend_options["quantized"], by_checkpoint = quant.plan(
                    _dense_where_adapted(_runnable(backend, quant_checkpoint.module_formats(path, hf_config)),
                                         lora),
                    family.checkpoint_map(config).fused)
            backend_options["checkpoint"] = _Stream(
                lambda: quant_checkpoint.converted(weights.iter_tensors(path), stored, by_checkpoint), path)
        if lora is not None:
            backend_options["checkpoint"] = _with_adapter(backend_options.get("checkpoint"), path, lora,
                                                          family.checkpoint_map(config).rename)
    runner = backend.load(path, family, config, dtype=dtype, device=device, **backend_options)
    model = Model(path, hf_config, family, config, runner, tokenizer, time.perf_counter() - started, name=name,
                  default_options=options, default_system=system)
    model.adapter = Path(adapter) if adapter is not None else None
    log.info("loaded %s in %.2fs", model, model.load_seconds)
    return model
