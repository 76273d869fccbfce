"""Settings: defaults < config file < .env < MRS_* environment < explicit flags.

Each value remembers where it came from (``Settings.sources``) so ``mrs config
sources`` can explain a surprising value.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs
from dotenv import dotenv_values

from mrs.errors import MrsError

APP = "mrs"
ENV_PREFIX = "MRS_"
DEVICES = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_home() -> Path:
    return Path(platformdirs.user_cache_dir(APP)) / "models"


def config_file() -> Path:
    return Path(os.environ.get("MRS_CONFIG") or Path(platformdirs.user_config_dir(APP)) / "config.toml")


@dataclass
class Settings:
    """Process-wide settings; construct with ``Settings.load(**flags)``."""

    home: Path = field(default_factory=default_home)
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 11434
    max_batch: int = 8
    max_loaded_models: int = 2
    keep_alive: str = "5m"
    api_key: str = ""
    mirror: str = ""
    max_context: int = 4096
    max_queue: int = 64
    max_body_bytes: int = 10_000_000
    cors_origins: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **flags: Any) -> "Settings":
        """Merge every layer; unknown flags or bad values raise MrsError."""
        settings, known = cls(), {f.name for f in fields(cls) if f.name != "sources"}
        settings.sources = {name: "default" for name in known}
        layers: list[tuple[str, dict[str, Any]]] = []
        path = config_file()
        if path.is_file():
            try:
                layers.append((f"config file {path}", tomllib.loads(path.read_text())))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise MrsError(f"config file {path} is not valid TOML: {e}") from e
        if env_file and Path(env_file).is_file():
            layers.append((f".env {env_file}", _prefixed(dotenv_values(env_file))))
        layers.append(("environment", _prefixed(os.environ)))
        layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
        for source, values in layers:
            for key, value in values.items():
                if key not in known:
                    if source == "flag":
                        raise MrsError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
                    continue
                setattr(settings, key, _coerce(key, value, source))
                settings.sources[key] = source
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise MrsError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise MrsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("port", "max_batch", "max_loaded_models", "max_context", "max_queue", "max_body_bytes"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise MrsError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("sources")
        out["home"] = str(self.home)
        return out


def _prefixed(env: Any) -> dict[str, Any]:
    return {k[len(ENV_PREFIX):].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX) and v is not None}


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[key]
    try:
        if kind == "Path":
            return Path(os.path.expanduser(str(value)))
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise MrsError(f"setting {key} from {source} must be {kind}, got {value!r}") from e
