"""Settings: defaults < config file < .env < MRS_* environment < explicit flags.

Each value remembers where it came from (``Settings.sources``) so ``mrs config
sources`` can explain a surprising value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs
from dotenv import dotenv_values

from mrs import compile_cache
from mrs.errors import MrsError

APP = "mrs"
ENV_PREFIX = "MRS_"
DEVICES = ("auto", "cpu", "gpu", "tpu", "mlx")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "int8", "int4", "none")


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
    quantize: str = "auto"
    tensor_parallel: int = 1
    host: str = "127.0.0.1"
    port: int = 11434
    max_batch: int = 8
    max_loaded_models: int = 2
    keep_alive: str = "5m"
    api_key: str = ""
    mirror: str = ""
    max_context: int = 4096
    max_queue: int = 64
    prefix_reuse: bool = True
    max_body_bytes: int = 10_000_000
    cors_origins: str = ""
    compile_cache: str = field(default_factory=lambda: str(compile_cache.default_root()))
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **flags: Any) -> Settings:
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
        if self.quantize not in QUANTIZE:
            raise MrsError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        for name in ("port", "max_batch", "max_loaded_models", "max_context", "max_queue", "max_body_bytes",
                     "tensor_parallel"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise MrsError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def load_options(self) -> dict[str, Any]:
        """What ``quantize`` and ``tensor_parallel`` ask of ``mrs.load``: auto runs quantized files
        quantized and dense ones dense; int8/int4 quantize dense weights at load; none
        dequantizes everything; tensor_parallel N > 1 splits each model over N devices."""
        options: dict[str, Any] = {"tensor_parallel": self.tensor_parallel} if self.tensor_parallel != 1 else {}
        if self.quantize == "none":
            options["dequantize"] = True
        elif self.quantize in ("int8", "int4"):
            options["quantize"] = self.quantize
        return options

    @property
    def compile_cache_dir(self) -> Path | None:
        """Where compiled steps persist (None: ``compile_cache = "off"``)."""
        return compile_cache.root(self.compile_cache)

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
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            return _to_bool(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise MrsError(f"setting {key} from {source} must be {kind}, got {value!r}") from e


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


# ---------------------------------------------------------------------------------------
# `mrs config`: the file, its checks, and the environment variables.
# ---------------------------------------------------------------------------------------

DESCRIPTIONS = {
    "home": "models directory (org/model lives in <home>/org--model)",
    "device": f"where models run: {' | '.join(DEVICES)}",
    "dtype": f"weight and compute dtype: {' | '.join(DTYPES)} (auto: float32 on CPU, bfloat16 elsewhere)",
    "quantize": f"weights: {' | '.join(QUANTIZE)} (auto: GGUF files stay quantized, dense models dense; "
                "int8/int4: quantize dense weights at load; none: dequantize GGUF files)",
    "host": "address `mrs serve` listens on",
    "port": "port `mrs serve` listens on (Ollama's is 11434)",
    "max_batch": "requests decoded together per model in the server",
    "max_loaded_models": "models the server keeps loaded at once",
    "keep_alive": "how long the server keeps an idle model loaded (seconds or 5m, 1h; negative: forever)",
    "api_key": "if set, the server requires `Authorization: Bearer <key>`",
    "mirror": "Hugging Face Hub endpoint for pull and search (a mirror); empty: huggingface.co or HF_ENDPOINT",
    "max_context": "longest context (tokens) the server allocates per request",
    "max_queue": "requests the server queues before answering 503",
    "prefix_reuse": "the server reuses a finished request's cached prefix for the next request that "
                    "starts with it (off: every request prefills its whole prompt)",
    "max_body_bytes": "largest request body the server accepts",
    "cors_origins": "comma-separated origins allowed by the server's CORS headers",
    "compile_cache": "folder where compiled steps persist between runs (off: compile in every process); "
                     "`mrs config cache` shows what it holds, `mrs config clear-cache` empties it",
}


SECRETS = frozenset({"api_key"})


def setting_names() -> list[str]:
    return [f.name for f in fields(Settings) if f.name != "sources"]


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def toml_value(value: Any) -> str:
    """A Python scalar as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def render_toml(settings: Settings, with_sources: bool = False) -> str:
    """The effective settings as TOML (optionally with each value's source as a comment)."""
    lines = []
    for name, value in settings.as_dict().items():
        if name in SECRETS and value:
            value = "********"  # never print a secret; `config sources` still says where it came from
        line = f"{name} = {toml_value(value)}"
        if with_sources:
            line += f"  # {settings.sources.get(name, 'default')}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def init_file(path: Path | None = None, force: bool = False) -> Path:
    """Write a commented config file listing every setting at its default; refuses to overwrite."""
    path = Path(path) if path else config_file()
    if path.exists() and not force:
        raise MrsError(f"config file {path} already exists; edit it, or pass --force to start over")
    defaults = Settings()
    lines = ["# mrs configuration. Precedence: defaults < this file < .env < MRS_* environment < flags.",
             "# Uncomment a line to change a value; `mrs config validate` checks the file.", ""]
    for name, value in defaults.as_dict().items():
        lines.append(f"# {DESCRIPTIONS.get(name, name)} ({env_var(name)})")
        lines.append(f"# {name} = {toml_value(value)}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def check_file(path: Path | None = None) -> list[str]:
    """Problems in a config file (empty list: it is valid); a missing file is a problem."""
    path = Path(path) if path else config_file()
    if not path.is_file():
        return [f"{path} does not exist (create it with `mrs config init`)"]
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return [f"{path} is not valid TOML: {e}"]
    known, problems = setting_names(), []
    settings = Settings()
    for key, value in data.items():
        if key not in known:
            problems.append(f"unknown setting {key!r} (known: {', '.join(known)})")
        elif isinstance(value, (dict, list)):
            problems.append(f"{key} must be a single value, got {type(value).__name__}")
        else:
            try:
                setattr(settings, key, _coerce(key, value, f"config file {path}"))
            except MrsError as e:
                problems.append(str(e))
    if not problems:
        try:
            settings.validate()
        except MrsError as e:
            problems.append(str(e))
    return problems


def env_rows(environ: Any = None) -> list[tuple[str, str, str]]:
    """(variable, value now or "", what it sets) for every MRS_* variable mrs reads."""
    environ = os.environ if environ is None else environ
    def shown(name: str) -> str:
        value = environ.get(env_var(name), "")
        return "(set)" if value and name in SECRETS else value

    rows = [(env_var(n), shown(n), DESCRIPTIONS.get(n, n)) for n in setting_names()]
    rows.append(("MRS_CONFIG", environ.get("MRS_CONFIG", ""), f"config file path (default {config_file()})"))
    rows.append(("HF_TOKEN", "(set)" if environ.get("HF_TOKEN") else "", "Hugging Face token for gated/private pulls"))
    return rows
