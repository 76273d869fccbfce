"""Text embeddings from encoder models: ``mrs.embed(model, texts) -> [n, dim] float32``.

The pooling is what sentence-transformers would do with the model folder:
``modules.json`` lists Transformer -> Pooling (``1_Pooling/config.json``: mean, cls,
max, mean_sqrt_len, weightedmean, lasttoken) -> optional Normalize, and
``sentence_bert_config.json`` gives ``max_seq_length`` (texts are truncated to it)
and ``do_lower_case``. A folder without those files gets mean pooling, no
normalisation, truncation at the model's context.

Texts are grouped by length and run in batches padded to a few bucket shapes
(powers of two in rows and tokens), so a warm model never recompiles and a long
text does not make the short ones pay for its padding.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from mrs.engine.shapes import MIN_PROMPT_BUCKET, bucket
from mrs.errors import (
    InvalidParameterError,
    NotAModelError,
    TokenizerError,
    UnsupportedModelError,
)

MAX_BATCH = 32
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")   # sentence-transformers' order


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: modes (concatenated in this order), then Normalize.

    Each backend computes it over its encoder's states (``Runner.embed``)."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False

    @classmethod
    def from_folder(cls, folder: Path) -> Pooling | None:
        """The folder's sentence-transformers setup, or None if it has no modules.json."""
        folder = Path(folder)
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return None
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise NotAModelError(f"{modules_file} must hold a list of modules")
        modes: tuple[str, ...] | None = None
        normalize = False
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = str(module.get("path", ""))
            if kind == "Transformer":
                if path not in ("", "."):
                    raise UnsupportedModelError(f"{modules_file}: the Transformer module in subfolder {path!r} is "
                                                "not supported (mrs loads the weights at the folder's root)")
            elif kind == "Pooling":
                modes = _pooling_modes(_read_json(folder / path / "config.json"), folder / path / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                raise UnsupportedModelError(f"{modules_file}: sentence-transformers module {module.get('type')!r} "
                                            "is not supported (supported: Transformer, Pooling, Normalize)")
        if modes is None:
            raise UnsupportedModelError(f"{modules_file} has no Pooling module, so there is no way to embed a text")
        settings_file = folder / "sentence_bert_config.json"
        settings = _read_json(settings_file) if settings_file.is_file() else {}
        max_seq = settings.get("max_seq_length")
        return cls(modes=modes, normalize=normalize, max_seq_length=int(max_seq) if max_seq else None,
                   lowercase=bool(settings.get("do_lower_case", False)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise NotAModelError(f"{path} is missing (listed in modules.json)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAModelError(f"{path} is not valid JSON: {e}") from e


def _pooling_modes(config: Any, path: Path) -> tuple[str, ...]:
    if not isinstance(config, dict):
        raise NotAModelError(f"{path} must hold a JSON object")
    if isinstance(config.get("pooling_mode"), str):      # the short spelling of newer versions
        chosen = {config["pooling_mode"].replace("mean_sqrt_len_tokens", "mean_sqrt_len")}
    else:
        chosen = {mode for mode in POOLING_MODES
                  if config.get(f"pooling_mode_{mode}_tokens") or config.get(f"pooling_mode_{mode}")}
        if config.get("pooling_mode_cls_token"):
            chosen.add("cls")
    unknown = chosen - set(POOLING_MODES)
    if unknown or not chosen:
        raise UnsupportedModelError(f"{path}: pooling {sorted(unknown) or 'none'} is not supported "
                                    f"(supported: {', '.join(POOLING_MODES)})")
    return tuple(mode for mode in POOLING_MODES if mode in chosen)


class Embedder:
    """Tokenizer, pooling and the compiled encode step of one encoder model."""

    def __init__(self, model: Any):
        if model.family.kind != "encoder":
            if Pooling.from_folder(model.path) is None:
                raise UnsupportedModelError(
                    f"model {model.name} is a {model.family.kind} (text generation) model without a "
                    "sentence-transformers pooling setup (modules.json, 1_Pooling/config.json), so it cannot "
                    "embed; use an embedding model such as sentence-transformers/all-MiniLM-L6-v2")
            raise UnsupportedModelError(f"model {model.name} has a pooling setup, but embedding with "
                                        f"{model.family.kind} models is not supported yet; use an encoder (BERT)")
        if model.tokenizer is None:
            raise TokenizerError(f"model {model.name} has no tokenizer.json, so it cannot embed text")
        self.pooling = Pooling.from_folder(model.path) or Pooling()
        context = model.context_length
        self.max_length = min(self.pooling.max_seq_length or context, context)
        # A private copy: tokenizer.json may carry its own padding/truncation (all-MiniLM pads to 128).
        self.tokenizer = HFTokenizer.from_str(model.tokenizer.hf.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.dim = model.config.hidden_size * len(self.pooling.modes)
        self.runner = model.runner

    def compiled_count(self) -> int:
        """How many shapes the encode step has been compiled for (for no-recompile tests)."""
        return self.runner.compiled_count()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.pooling.lowercase:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def __call__(self, model: Any, ids: list[list[int]], batch_size: int = MAX_BATCH) -> np.ndarray:
        """Pooled vectors [n, dim] float32 for token id lists.

        Texts are grouped by length bucket, so a long text never makes short ones pay
        for its padding; each group runs in batches of up to ``batch_size`` rows.
        """
        out = np.zeros((len(ids), self.dim), np.float32)
        groups: dict[int, list[int]] = {}
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            groups.setdefault(bucket(len(ids[i]), MIN_PROMPT_BUCKET, self.max_length), []).append(i)
        for width, members in groups.items():
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                out[rows] = self._run(model, [ids[i] for i in rows], width, bucket(len(rows), 1, batch_size))
        return out

    def _run(self, model: Any, ids: list[list[int]], width: int, height: int) -> np.ndarray:
        """One padded [height, width] batch -> [len(ids), dim]."""
        tokens = np.zeros((height, width), np.int32)
        mask = np.zeros((height, width), bool)
        for r, row in enumerate(ids):
            tokens[r, :len(row)] = row
            mask[r, :len(row)] = True
        return self.runner.embed(tokens, mask, self.pooling)[:len(ids)]


_EMBEDDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embedder(model: Any) -> Embedder:
    """The model's Embedder, built once per loaded model (or a clear error if it cannot embed)."""
    if model not in _EMBEDDERS:
        _EMBEDDERS[model] = Embedder(model)
    return _EMBEDDERS[model]


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise InvalidParameterError("texts", texts, "a string or a list of strings")
    return list(texts)


@dataclass
class Embeddings:
    """The vectors of a batch of texts, with token counts and timing."""

    vectors: np.ndarray                     # [n, dim] float32
    token_counts: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, model_name: str) -> dict:
        """A JSON-able result (the shape of Ollama's /api/embed answer)."""
        return {"model": model_name, "embeddings": self.vectors.tolist(),
                "total_duration": int(self.seconds * 1e9), "prompt_eval_count": int(sum(self.token_counts))}


def embed_texts(model: Any, texts: list[str] | str) -> Embeddings:
    """Embed texts and report token counts and time (what the CLI and servers print)."""
    texts = _texts(texts)
    started = time.perf_counter()
    runner = embedder(model)
    ids = runner.tokenize(texts)
    vectors = runner(model, ids) if ids else np.zeros((0, runner.dim), np.float32)
    return Embeddings(vectors, [len(i) for i in ids], time.perf_counter() - started)


def embed(model: Any, texts: list[str] | str) -> np.ndarray:
    """Embeddings [len(texts), dim] float32 of texts (truncated to the model's max length)."""
    return embed_texts(model, texts).vectors
