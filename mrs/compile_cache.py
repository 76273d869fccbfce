"""Where compiled steps persist between processes, and how a first compile is reported.

The ``compile_cache`` setting (``MRS_COMPILE_CACHE``) names the folder; empty means
``<user cache>/mrs/compiled``, ``off`` switches persistence off. Each backend keeps its
entries in a subfolder named for the library versions that wrote them
(``jax-0.10.2-jaxlib-0.10.2``), so an upgrade starts a fresh folder and never reads an old
one, and ``clear`` can remove exactly what mrs wrote, nothing else in a folder a user named.

Backend-free: ``mrs config cache`` never imports jax.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import platformdirs

OFF = frozenset({"off", "none", "false", "no", "0"})
VERSION_PREFIXES = ("jax-", "tokenizers-")   # the subfolders mrs writes (see version_folder)


def default_root() -> Path:
    return Path(platformdirs.user_cache_dir("mrs")) / "compiled"


def root(value: str) -> Path | None:
    """The cache folder for a ``compile_cache`` setting's value, None when off."""
    value = str(value).strip()
    if value.lower() in OFF:
        return None
    return Path(os.path.expanduser(value)) if value else default_root()


def version_folder(base: Path, **versions: str) -> Path:
    """``base/jax-0.10.2-jaxlib-0.10.2`` for versions jax=..., jaxlib=... (in that order)."""
    return base / "-".join(f"{name}-{version}" for name, version in versions.items())


def read_text(path: Path) -> str | None:
    """An entry's text, or None when it is absent or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_atomic(path: Path, data: bytes) -> bool:
    """Write an entry through a temporary file renamed into place, so another process sees
    all of it or none; False (and nothing left behind) if it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def _ours(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(VERSION_PREFIXES))


def summary(base: Path) -> list[tuple[str, int, int]]:
    """(subfolder, files, bytes) for each library version's entries under ``base``."""
    rows = []
    for folder in _ours(base):
        files = [p for p in folder.rglob("*") if p.is_file()]
        rows.append((folder.name, len(files), sum(p.stat().st_size for p in files)))
    return rows


def clear(base: Path) -> int:
    """Remove every version subfolder mrs wrote under ``base``; returns the bytes freed.
    Other files in ``base`` (a folder the user chose may hold them) are left alone."""
    freed = sum(size for _, _, size in summary(base))
    for folder in _ours(base):
        shutil.rmtree(folder, ignore_errors=True)
    return freed


# --- reporting a first compile -----------------------------------------------------------

Reporter = Callable[[str], Any]     # what -> a context manager held while it compiles
_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> None:
    """Who hears about compiles (the CLI shows a status line); None: nobody."""
    global _reporter
    _reporter = reporter


@contextlib.contextmanager
def compiling(what: str) -> Iterator[None]:
    """Held by a backend while it compiles ``what`` (and found no persisted copy)."""
    reporter = _reporter
    if reporter is None:
        yield
        return
    with reporter(what):
        yield


def terminal_reporter(stream: Any = None) -> Reporter:
    """A rich status spinner on a terminal; one plain line per compile elsewhere (logs, pipes).
    Writes to ``stream`` or, by default, to whatever sys.stderr is at the time."""

    @contextlib.contextmanager
    def report(what: str) -> Iterator[None]:
        out = stream or sys.stderr
        message = f"compiling {what} for this model and shape, once (later runs load it from the cache)"
        try:
            terminal = out.isatty()
        except (ValueError, OSError):   # a closed stream: say nothing rather than fail the compile
            yield
            return
        if terminal:
            from rich.console import Console

            with Console(file=out).status(message):
                yield
        else:
            print(f"mrs: {message}", file=out, flush=True)
            yield

    return report
