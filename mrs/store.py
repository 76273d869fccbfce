"""The models directory: names, folders and what makes a folder a model.

A model is referred to by a folder path or by a Hub-style name ``org/model``
(or a bare ``model``), stored as ``<home>/org--model``. Names are validated so
no reference can reach outside the models directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from mrs.errors import InvalidModelNameError, ModelNotFoundError, NotAModelError

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$")
SEPARATOR = "--"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe ``org/model`` or ``model`` name, else raise."""
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 200:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use 'org/model' or 'model' with letters, digits, '.', '_' and '-'"
        )
    if any(part in (".", "..") or part.startswith(".") for part in name.split("/")):
        raise InvalidModelNameError(f"invalid model name {name!r}: parts may not start with '.'")
    if SEPARATOR in name:
        raise InvalidModelNameError(f"invalid model name {name!r}: '{SEPARATOR}' is reserved")
    return name


def folder_name(name: str) -> str:
    """``org/model`` -> ``org--model`` (the on-disk folder name)."""
    return validate_name(name).replace("/", SEPARATOR)


def model_name(folder: str | Path) -> str:
    """``org--model`` -> ``org/model``."""
    return Path(folder).name.replace(SEPARATOR, "/", 1)


def model_dir(home: Path, name: str) -> Path:
    """The folder a named model lives in (it may not exist yet)."""
    path = (Path(home) / folder_name(name)).resolve()
    if path.parent != Path(home).resolve():
        raise InvalidModelNameError(f"model name {name!r} escapes the models directory")
    return path


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().is_dir()


def resolve(ref: str | Path, home: Path | None = None) -> Path:
    """Find the model folder for a path or a name, checking it is a model folder."""
    if isinstance(ref, Path) or looks_like_path(str(ref)):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model folder {path} does not exist")
        check_model_folder(path)
        return path
    if home is None:
        from mrs.config import Settings

        home = Settings.load().home
    path = model_dir(home, str(ref))
    if not path.is_dir():
        raise ModelNotFoundError(f"model '{ref}' not found in {home} — try `mrs pull {ref}`")
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    """Raise NotAModelError naming what is missing from a would-be model folder."""
    if not path.is_dir():
        raise NotAModelError(f"{path} is not a folder")
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
                  if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file())
