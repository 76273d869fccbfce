"""A loaded model: config, params on a device, tokenizer, compiled steps.

``load()`` builds the Flax module abstractly (no memory), fills it from the
safetensors checkpoint, and splits it once into a graphdef and a param pytree so
every step is a pure jitted function of the params.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrs import archs, store
from mrs.cache import step_positions
from mrs.errors import ContextLengthError, InvalidParameterError, MrsError
from mrs.store import read_json
from mrs.tokenizer import Tokenizer
from mrs.weights import load_params

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def pick_device(device: str | None) -> jax.Device:
    """'auto' | 'cpu' | 'gpu' | 'tpu' -> a JAX device, with a clear error if absent."""
    device = device or "auto"
    if device == "auto":
        return jax.devices()[0]
    try:
        return jax.devices(device)[0]
    except RuntimeError as e:
        raise MrsError(f"device {device!r} is not available here ({e}); use --device auto or cpu") from e


def pick_dtype(dtype: str | None, device: jax.Device) -> Any:
    """'auto' is float32 on CPU (XLA's bf16 on CPU is several times slower), else bfloat16."""
    dtype = dtype or "auto"
    if dtype == "auto":
        return jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", dtype, f"one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bind(graphdef: Any, params: dict) -> nnx.Module:
    """The Flax module for a graphdef and a pure param dict (inside or outside jit)."""
    return nnx.merge(graphdef, nnx.State(params))


class Model:
    """A model ready to run.

    ``params`` is a nested dict of arrays (``nnx.to_pure_dict`` of the module state):
    jit flattens a plain dict in C++, where NNX variables cost ~1.5 ms of Python per
    call on a 30-layer model — a few percent of a CPU decode step.
    """

    def __init__(self, path: Path, hf_config: dict, arch: archs.Architecture, config: Any, graphdef: Any,
                 params: Any, dtype: Any, device: jax.Device, tokenizer: Tokenizer | None, load_seconds: float):
        self.path, self.hf_config, self.arch, self.config = path, hf_config, arch, config
        self.graphdef, self.params, self.dtype, self.device = graphdef, params, dtype, device
        self.tokenizer, self.load_seconds = tokenizer, load_seconds
        self.name = path.name.replace(store.SEPARATOR, "/", 1)
        gen_path = path / "generation_config.json"
        self.generation_config = read_json(gen_path) if gen_path.is_file() else {}
        self.eos_ids = self._eos_ids()
        self._steps = None

    @property
    def context_length(self) -> int:
        length = getattr(self.config, "context_length", None) or getattr(self.config, "max_position_embeddings", 0)
        return int(length or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))

    @property
    def steps(self):
        if self._steps is None:
            from mrs.engine.steps import Steps

            self._steps = Steps(self)
        return self._steps

    def module(self) -> nnx.Module:
        """The Flax module with these params, for experiments outside the engine."""
        return bind(self.graphdef, self.params)

    def init_cache(self, slots: int, max_len: int):
        """Fresh per-slot state (KV or SSM) for ``slots`` rows of up to ``max_len`` tokens."""
        with jax.default_device(self.device):
            return self.arch.model_cls.init_cache(self.config, slots, max_len, self.dtype)

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
        if self.arch.kind != "causal":
            raise MrsError(f"model {self.name} is an {self.arch.kind}: it has no next-token logits; use mrs.embed()")
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
        batch, seq = ids.shape
        cache = self.init_cache(batch, seq)
        positions = step_positions(jnp.zeros((batch,), jnp.int32), jnp.full((batch,), seq, jnp.int32), seq)
        logits, _ = self.steps.forward(self.params, jnp.asarray(ids, jnp.int32), positions, cache)
        return np.asarray(logits, dtype=np.float32)

    def __repr__(self) -> str:
        return f"<mrs.Model {self.name} {self.hf_config.get('model_type')} {self.num_params:,} params {self.dtype}>"


def load(ref: str | Path, dtype: str | None = None, device: str | None = None, home: Path | None = None) -> Model:
    """Load a model from a folder path or an ``org/model`` name in the models directory."""
    started = time.perf_counter()
    if home is None or dtype is None or device is None:
        from mrs.config import Settings

        settings = Settings.load()
        home = home or settings.home
        dtype = dtype or settings.dtype
        device = device or settings.device
    path = store.resolve(ref, home)
    hf_config = read_json(path / "config.json")
    arch, config = archs.resolve(hf_config)
    dev = pick_device(device)
    jdtype = pick_dtype(dtype, dev)
    abstract = nnx.eval_shape(lambda: arch.model_cls(config, dtype=jdtype))
    graphdef, state = nnx.split(abstract)
    expected = {".".join(map(str, path_)): var.get_value() for path_, var in nnx.to_flat_state(state)}
    with jax.default_device(dev):
        fused = getattr(arch.module, "fused", None)
        arrays = load_params(path, expected, jdtype, ignore=arch.module.ignored,
                             rename=getattr(arch.module, "rename", None), fused=fused(config) if fused else None)
    flat = nnx.to_flat_state(state)
    for path_, var in flat:
        var.set_value(arrays[".".join(map(str, path_))])
    params = nnx.to_pure_dict(nnx.from_flat_state(flat))
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    model = Model(path, hf_config, arch, config, graphdef, params, jdtype, dev, tokenizer,
                  time.perf_counter() - started)
    log.info("loaded %s in %.2fs", model, model.load_seconds)
    return model
