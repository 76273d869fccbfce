"""Ollama's model store, read-only: ``name[:tag]`` -> the GGUF blob it points to, with the
model's default options and system prompt.

Layout (under ``$OLLAMA_MODELS``, default ``~/.ollama/models``):
``manifests/<host>/<namespace>/<name>/<tag>`` is a JSON manifest whose ``layers`` name blobs
by digest, stored as ``blobs/sha256-<hex>``. The layer of media type
``application/vnd.ollama.image.model`` is the GGUF; ``...params`` holds default options
(JSON: stop, temperature, ...), ``...system`` the default system prompt, ``...template`` a
Go template (mrs renders the GGUF's own Jinja chat template instead). A name is
``[host/][namespace/]name[:tag]``, defaulting to ``registry.ollama.ai``, ``library`` and
``latest``. mrs never writes here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrs.errors import InvalidModelNameError, ModelNotFoundError, MrsError, NotAModelError, UnsupportedModelError

DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MODEL, PARAMS, SYSTEM = ("application/vnd.ollama.image.model", "application/vnd.ollama.image.params",
                         "application/vnd.ollama.image.system")
OTHER_PAYLOADS = {"application/vnd.ollama.image.projector": "a vision projector",
                  "application/vnd.ollama.image.adapter": "a LoRA adapter",
                  "application/vnd.ollama.image.tensor": "safetensors tensors"}
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_DIGEST = re.compile(r"^sha256[:-][0-9a-f]{64}$")


def root() -> Path:
    """Where Ollama keeps its models on this machine."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    name: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> OllamaName:
        """``llama3.2``, ``llama3.2:1b``, ``user/model:tag``, ``hf.co/org/repo:Q4_K_M``."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidModelNameError(f"invalid Ollama model name {text!r}")
        path, _, tag = text.strip().partition(":")
        parts = path.split("/")
        if len(parts) > 3 or not all(_PART.match(p) for p in parts) or (tag and not _PART.match(tag)):
            raise InvalidModelNameError(f"invalid Ollama model name {text!r} (expected [host/][namespace/]name[:tag])")
        host = parts[0] if len(parts) == 3 else DEFAULT_HOST
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        return cls(host, namespace, parts[-1], tag or DEFAULT_TAG)

    def __str__(self) -> str:
        short = self.name if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.name}"
        short = short if self.host == DEFAULT_HOST else f"{self.host}/{self.namespace}/{self.name}"
        return f"{short}:{self.tag}"


@dataclass
class OllamaModel:
    """One model of Ollama's store: its GGUF blob and its defaults."""

    name: str
    gguf: Path
    options: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    size: int = 0
    manifest: Path | None = None


def _blob(store: Path, digest: str) -> Path:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise NotAModelError(f"Ollama manifest names an invalid blob digest {digest!r}")
    return store / "blobs" / digest.replace(":", "-")


def _layers(manifest_path: Path) -> list[dict]:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAModelError(f"Ollama manifest {manifest_path} is not valid JSON: {e}") from e
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise NotAModelError(f"Ollama manifest {manifest_path} has no list of layers")
    return layers


def resolve(text: str, store: Path | None = None) -> OllamaModel:
    """The model ``text`` names in Ollama's store (raises ModelNotFoundError if absent)."""
    store = root() if store is None else Path(store)
    name = OllamaName.parse(text)
    manifest = store / "manifests" / name.host / name.namespace / name.name / name.tag
    if not manifest.is_file():
        raise ModelNotFoundError(f"model {text!r} is not in Ollama's store ({store})")
    return _read(store, manifest, str(name))


def find(text: str, store: Path | None = None) -> OllamaModel | None:
    """The Ollama model ``text`` names, or None when the name is not one or is not there."""
    try:
        return resolve(text, store)
    except (InvalidModelNameError, ModelNotFoundError):
        return None


def _read(store: Path, manifest: Path, name: str) -> OllamaModel:
    layers = _layers(manifest)
    kinds = {layer.get("mediaType") for layer in layers}
    models = [layer for layer in layers if layer.get("mediaType") == MODEL]
    if not models:
        payload = ", ".join(sorted(OTHER_PAYLOADS[k] for k in kinds if k in OTHER_PAYLOADS)) or "no model layer"
        raise UnsupportedModelError(f"Ollama model {name} holds {payload} but no GGUF model mrs can run")
    if len(models) > 1:
        raise UnsupportedModelError(f"Ollama model {name} has {len(models)} model layers; mrs runs one")
    for kind in kinds & set(OTHER_PAYLOADS):
        raise UnsupportedModelError(f"Ollama model {name} needs {OTHER_PAYLOADS[kind]} beside its GGUF, "
                                    "which mrs does not run yet")
    gguf = _blob(store, models[0].get("digest"))
    if not gguf.is_file():
        raise NotAModelError(f"Ollama manifest {manifest} points to blob {gguf.name}, which is missing "
                             "(run `ollama pull` again)")
    out = OllamaModel(name, gguf, size=int(models[0].get("size") or 0), manifest=manifest)
    for layer in layers:
        kind = layer.get("mediaType")
        if kind not in (PARAMS, SYSTEM):
            continue
        blob = _blob(store, layer.get("digest"))
        try:
            content = blob.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise NotAModelError(f"Ollama blob {blob.name} ({kind}) cannot be read: {e}") from e
        if kind == SYSTEM:
            out.system = content
        else:
            try:
                options = json.loads(content)
            except json.JSONDecodeError as e:
                raise NotAModelError(f"Ollama params blob {blob.name} is not valid JSON: {e}") from e
            if not isinstance(options, dict):
                raise NotAModelError(f"Ollama params blob {blob.name} is not a JSON object")
            out.options = options
    return out


def list_models(store: Path | None = None) -> list[OllamaModel | tuple[str, Exception]]:
    """Every model in Ollama's store (or (name, error) for those mrs cannot read)."""
    store = root() if store is None else Path(store)
    base = store / "manifests"
    if not base.is_dir():
        return []
    found: list[OllamaModel | tuple[str, Exception]] = []
    for manifest in sorted(p for p in base.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = manifest.relative_to(base).parts
        name = str(OllamaName(host, namespace, model, tag))
        try:
            found.append(_read(store, manifest, name))
        except (NotAModelError, UnsupportedModelError) as e:
            found.append((name, e))
    return found


def infos(store: Path | None = None) -> list[dict]:
    """``model_info`` rows of the store's models (``source: ollama``), for `mrs list` and /api/tags;
    a model mrs cannot read is a row with its error."""
    from mrs import store as mrs_store

    rows = []
    for entry in list_models(store):
        if isinstance(entry, tuple):
            rows.append({"name": entry[0], "error": str(entry[1]), "source": "ollama"})
            continue
        try:
            rows.append(mrs_store.model_info(entry.gguf) | {"name": entry.name, "source": "ollama"})
        except MrsError as e:
            rows.append({"name": entry.name, "error": str(e), "source": "ollama"})
    return rows
