"""The models directory: names, folders and what makes a folder a model.

A model is referred to by a folder path or by a Hub-style name ``org/model``
(or a bare ``model``), stored as ``<home>/org--model``. Names are validated so
no reference can reach outside the models directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import uuid
from pathlib import Path

from mrs.errors import (
    InvalidModelNameError,
    ModelNotFoundError,
    MrsError,
    NotAModelError,
    WeightsError,
)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$")
SEPARATOR = "--"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe ``org/model`` or ``model`` name, else raise."""
    if isinstance(name, str) and any(part in (".", "..") for part in name.replace("\\", "/").split("/")):
        raise InvalidModelNameError(f"invalid model name {name!r}: it would escape the models directory")
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 200:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use 'org/model' or 'model' with letters, digits, '.', '_' and '-'"
        )
    if any(part.startswith(".") for part in name.split("/")):
        raise InvalidModelNameError(f"invalid model name {name!r}: parts may not start with '.'")
    if SEPARATOR in name:
        raise InvalidModelNameError(f"invalid model name {name!r}: '{SEPARATOR}' is reserved")
    return name


QUANT_RE = re.compile(r"^[A-Za-z0-9_]{1,40}$")


# How Ollama (``hf.co/org/repo:Q4_K_M``) and a pasted URL name a Hub repo.
HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")


def strip_hub_prefix(name: str) -> str:
    """``hf.co/org/repo:Q4_K_M`` -> ``org/repo:Q4_K_M`` (the name mrs stores it under)."""
    name = name.strip()
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):].strip("/")
    return name


def split_quant(name: str) -> tuple[str, str | None]:
    """``org/repo-GGUF:Q4_K_M`` -> (``org/repo-GGUF``, ``Q4_K_M``): one quant of a GGUF repo
    (``hf.co/`` and Hub URL prefixes dropped)."""
    if isinstance(name, str):
        name = strip_hub_prefix(name)
    if isinstance(name, str) and ":" in name:
        base, _, quant = name.rpartition(":")
        if not QUANT_RE.match(quant):
            raise InvalidModelNameError(f"invalid model name {name!r}: the quant after ':' must be letters, "
                                        "digits and '_' (e.g. Q4_K_M)")
        return base, quant
    return name, None


def folder_name(name: str) -> str:
    """``org/model`` -> ``org--model`` (the on-disk folder name); ``org/repo:Q4_K_M`` ->
    ``org--repo--Q4_K_M`` (names never hold '--', so the second one marks the quant)."""
    base, quant = split_quant(name)
    folder = validate_name(base).replace("/", SEPARATOR)
    return f"{folder}{SEPARATOR}{quant}" if quant else folder


def model_name(folder: str | Path) -> str:
    """``org--model`` -> ``org/model``; ``org--repo--Q4_K_M`` -> ``org/repo:Q4_K_M``."""
    name = Path(folder).name.replace(SEPARATOR, "/", 1)
    return name.replace(SEPARATOR, ":", 1)


def gguf_in(folder: Path) -> Path | None:
    """The one GGUF file of a folder without config.json (a pulled GGUF quant), else None."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    files = [name for name in model_files(folder) if name.lower().endswith(".gguf")]
    return folder / files[0] if len(files) == 1 else None


def model_dir(home: Path, name: str) -> Path:
    """The folder a named model lives in (it may not exist yet)."""
    root = Path(home).expanduser().resolve()
    path = root / folder_name(name)  # one validated component; a symlinked model folder is allowed
    if path.parent != root:
        raise InvalidModelNameError(f"model name {name!r} escapes the models directory")
    return path


def looks_like_path(ref: str) -> bool:
    """A folder or file path (``model.gguf`` in the working directory counts), not a model name."""
    return (ref.startswith(("/", "./", "../", "~")) or ref.endswith(".gguf")
            or Path(ref).expanduser().is_dir() or Path(ref).expanduser().is_file())


def resolve(ref: str | Path, home: Path | None = None) -> Path:
    """Find the model folder (or GGUF file) for a path or a name, checking it is a model."""
    if isinstance(ref, Path) or looks_like_path(str(ref)):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model folder {path} does not exist")
        check_model_folder(path)
        return gguf_in(path) or path
    if home is None:
        from mrs.config import Settings

        home = Settings.load().home
    path = model_dir(home, str(ref))
    if not path.is_dir():
        raise ModelNotFoundError(f"model '{ref}' not found in {home} — try `mrs pull {ref}`")
    check_model_folder(path)
    return gguf_in(path) or path


def check_model_folder(path: Path) -> None:
    """Raise NotAModelError naming what is missing from a would-be model folder (a GGUF
    file passes as it is)."""
    if path.is_file():
        from mrs.gguf import is_gguf

        if is_gguf(path):
            return
        raise NotAModelError(f"{path} is a file but not a GGUF file (no GGUF magic); pass a model folder "
                             "or a .gguf file")
    if not path.is_dir():
        raise NotAModelError(f"{path} is not a folder")
    if gguf_in(path) is not None:
        return
    if not (path / "config.json").is_file():
        raise NotAModelError(
            f"model folder {path} has no config.json — is it a Hugging Face model folder? "
            "Try `mrs pull org/name`."
        )
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found pickle checkpoints {', '.join(bins)}, which mrs refuses to load: " \
               "pickle can run arbitrary code; convert them to safetensors)" if bins else ""
        raise NotAModelError(f"model folder {path} has no *.safetensors weights{hint}")


def list_models(home: Path) -> list[Path]:
    """Model folders under ``home`` (complete ones only: temp folders are skipped)."""
    if not Path(home).is_dir():
        return []
    return sorted(p for p in Path(home).iterdir()
                  if p.is_dir() and not p.name.startswith(".") and ((p / "config.json").is_file() or gguf_in(p)))


# ---------------------------------------------------------------------------------------
# What a model folder holds: files, parameters (from safetensors headers), summary.
# ---------------------------------------------------------------------------------------

CHECKSUMS = ".model_checksums"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


class ModelExistsError(MrsError):
    """The destination model already exists."""

    http_status = 409


class ChecksumError(MrsError):
    """A model file does not match its recorded SHA-256 (corrupt or changed)."""


def model_files(path: Path) -> list[str]:
    """Relative names of a model folder's files; hidden entries (.cache, the manifest) are not model files."""
    path = Path(path)
    out = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAModelError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise NotAModelError(f"{path} must hold a JSON object")
    return value


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without the weights."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{file.name} is not a readable safetensors file ({e}); pull the model again") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{file.name} has a malformed safetensors header; pull the model again")
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a model loads: the index's shards, else every top-level *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def quantized_parameters(path: Path, bits: int) -> int:
    """Weights of a quantized checkpoint: each module's codes unpacked, scales and biases not counted."""
    total = 0
    for file in weight_files(path):
        header = safetensors_header(file)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict) or name.endswith((".scales", ".biases")):
                continue
            numel = math.prod(int(d) for d in info.get("shape", []))
            quantized = name.endswith(".weight") and f"{name.removesuffix('.weight')}.scales" in header
            total += numel * 32 // bits if quantized else numel
    return total


def parameter_summary(path: Path) -> tuple[int, str]:
    """(parameter count, dominant dtype) from the safetensors headers."""
    counts: dict[str, int] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise WeightsError(f"shard {file.name} is missing from {path}; pull the model again")
        for name, info in safetensors_header(file).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            numel = math.prod(int(d) for d in info.get("shape", []))
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype", ""), str(info.get("dtype", "?")).lower())
            counts[dtype] = counts.get(dtype, 0) + numel
    if not counts:
        return 0, "unknown"
    return sum(counts.values()), max(counts, key=counts.__getitem__)


def has_chat_template(path: Path) -> bool:
    """Whether the folder carries a chat template (tokenizer_config.json or chat_template.jinja/json)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(read_json(config).get("chat_template"))
        except NotAModelError:
            return False
    return False


def human_count(n: int) -> str:
    """1234567 -> '1.2M' (Ollama's parameter_size style)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def model_info(path: Path) -> dict:
    """Summary of a model folder (or GGUF file) without loading weights: what `list`, `show` and
    /api/tags report."""
    path = Path(path)
    check_model_folder(path)
    gguf_file = path if path.is_file() else gguf_in(path)
    if gguf_file is not None:
        from mrs.gguf import summary

        info = summary(gguf_file) | ({"name": model_name(path), "path": str(path)} if path.is_dir() else {})
        return info | {"parameter_size": human_count(info["parameters"])}
    config = read_json(path / "config.json")
    files = model_files(path)
    stats = [(path / f).stat() for f in files]
    parameters, dtype = parameter_summary(path)
    if dtype == "unknown":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "unknown")
    quantized = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    if quantized and "bits" in quantized:        # MLX's layout: count weights, not uint32 words
        bits = int(quantized["bits"])
        dtype = f"Q{bits} g{quantized.get('group_size', 64)}"
        parameters = quantized_parameters(path, bits)
    model_type = str(config.get("model_type") or "unknown")
    architectures = config.get("architectures") or []
    context = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    return {
        "name": model_name(path),
        "path": str(path),
        "architecture": str(architectures[0]) if architectures else model_type,
        "model_type": model_type,
        "family": model_type,
        "parameters": parameters,
        "parameter_size": human_count(parameters),
        "dtype": dtype,
        "size_bytes": sum(s.st_size for s in stats),
        "modified": max((s.st_mtime for s in stats), default=path.stat().st_mtime),
        "context_length": context,
        "embedding_length": config.get("hidden_size") or config.get("d_model"),
        "chat_template": has_chat_template(path),
        "files": files,
        "digest": digest(path),
        "format": "quantized" if quantized else "safetensors",
    }


# ---------------------------------------------------------------------------------------
# Checksums: a SHA-256 manifest per folder (.model_checksums), written by pull and cp.
# ---------------------------------------------------------------------------------------

def sha256_file(file: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def compute_checksums(path: Path) -> dict[str, dict]:
    """{relative name: {"size", "sha256"}} for every model file."""
    path = Path(path)
    return {name: {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
            for name in model_files(path)}


def read_checksums(path: Path) -> dict | None:
    """The folder's manifest ({"files": {...}, "source"?: {...}}), or None if it has none."""
    file = Path(path) / CHECKSUMS
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise TypeError("no 'files' table")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ChecksumError(f"{file} is unreadable ({e}); recreate it with `mrs checksums --write`") from e
    return manifest


def write_checksums(path: Path, files: dict[str, dict] | None = None, source: dict | None = None) -> dict:
    """Write the manifest atomically (computing checksums unless given); return it."""
    path = Path(path)
    manifest: dict = {"version": 1, "algorithm": "sha256",
                      "files": dict(sorted((files if files is not None else compute_checksums(path)).items()))}
    if source:
        manifest["source"] = source
    tmp = path / f"{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path / CHECKSUMS)
    return manifest


def verify(path: Path) -> dict:
    """Check every file against the manifest; raise ChecksumError naming what is wrong.

    Returns {"checked": n, "unlisted": [files added since the manifest was written]}.
    """
    path = Path(path)
    manifest = read_checksums(path)
    if manifest is None:
        raise ChecksumError(f"{path} has no checksum manifest ({CHECKSUMS}); "
                            "create one with `mrs checksums NAME --write` once you trust the files")
    problems = []
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{name} has {file.stat().st_size} bytes, expected {entry.get('size')}")
        elif sha256_file(file) != entry.get("sha256"):
            problems.append(f"{name} does not match its SHA-256")
    if problems:
        raise ChecksumError(f"{model_name(path)}: {'; '.join(problems)} — the files are corrupt or were changed; "
                            "pull the model again")
    unlisted = [f for f in model_files(path) if f not in manifest["files"]]
    return {"checked": len(manifest["files"]), "unlisted": unlisted}


def digest(path: Path) -> str:
    """A stable "sha256:<hex>" identity: of the manifest's file table when there is one, else of config.json."""
    path = Path(path)
    try:
        manifest = read_checksums(path)
    except ChecksumError:
        manifest = None
    if manifest is not None:
        table = json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(table).hexdigest()
    return "sha256:" + sha256_file(path / "config.json")


# ---------------------------------------------------------------------------------------
# rm / cp: whole-folder operations that never leave a half-written model visible.
# ---------------------------------------------------------------------------------------

def temp_dir(home: Path, purpose: str, name: str) -> Path:
    """A hidden sibling in ``home`` (skipped by list_models) for work in progress on ``name``."""
    return Path(home) / f".{purpose}-{folder_name(name)}-{uuid.uuid4().hex[:8]}"


def remove(home: Path, name: str) -> None:
    """Delete a named model from the models directory (never a path outside it)."""
    path = model_dir(home, name)
    if not path.is_dir():
        raise ModelNotFoundError(f"model '{name}' not found in {home}")
    if path.is_symlink():  # a model linked in from elsewhere: drop the link, not the files
        path.unlink()
        return
    trash = temp_dir(home, "rm", name)
    os.rename(path, trash)  # atomic: the model vanishes whole, then its files are deleted
    shutil.rmtree(trash, ignore_errors=True)


def copy(home: Path, src: str, dst: str) -> Path:
    """Copy model ``src`` (a name or a folder) to the new name ``dst``; returns the new folder."""
    home = Path(home)
    source = resolve(src, home)
    target = model_dir(home, dst)
    if target.exists():
        raise ModelExistsError(f"model '{dst}' already exists in {home}; remove it first with `mrs rm {dst}`")
    home.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(home, "cp", dst)
    try:
        shutil.copytree(source, tmp, symlinks=False, ignore=shutil.ignore_patterns(".cache", "*.lock"))
        if target.exists():
            raise ModelExistsError(f"model '{dst}' appeared in {home} while copying; nothing was changed")
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
