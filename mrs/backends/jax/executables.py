"""Compiled steps that outlive the process.

A jitted step costs a fresh process three things before it runs: tracing the model
(Python over every layer), lowering it, and compiling. JAX's persistent cache saves only
the last, and the first two grow with depth (about 3.6 s for SmolLM2-135M's 30 layers on a
2-core CPU). So mrs stores each step's whole executable, serialized, and a later process
loads it back by a key it can compute without tracing.

The executables live in ``<compile cache>/jax-<version>-jaxlib-<version>/steps/`` (the folder of
the ``compile_cache`` setting, ``Settings.compile_cache_dir``),
keyed by everything their code and shapes depend on: mrs's own source, jax and jaxlib, the
device and the host CPU, XLA flags, the model's class, config, dtype and quantized formats,
and every argument's tree, shape and dtype. A hit is a file read and a load.

JAX's own persistent cache is not switched on: an executable it hands back was itself
deserialized, and serializing that again on CPU drops its compiled functions (the copy then
fails with "Function ... not found" when it runs). Where a user switched it on
(``JAX_COMPILATION_CACHE_DIR``), a step whose compile was such a hit is not stored.

An entry is written to a temporary file and renamed into place, so a reader never sees half
of one, and carries a SHA-256 of its bytes: a torn or corrupted entry is a miss (removed and
rebuilt), never a crash. Entries are pickles of executables, trusted like JAX's own cache:
the folder is the user's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import platform
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib

from mrs import compile_cache

log = logging.getLogger(__name__)

MAGIC = b"mrs-step-1\n"
# Counted per process (tests read them): hit, miss, stored, rejected, unstorable.
STATS: Counter[str] = Counter()

_lock = threading.Lock()
_store: StepStore | None = None
_configured = False


def store() -> StepStore | None:
    """The process's step store (None when the compile cache is off)."""
    global _store, _configured
    with _lock:
        if _configured:
            return _store
        _configured = True
        from mrs.config import Settings

        base = Settings.load().compile_cache_dir
        if base is None:
            return None
        folder = compile_cache.version_folder(base, jax=jax.__version__, jaxlib=_jaxlib_version())
        _store = StepStore(folder / "steps")
        jax.monitoring.register_event_listener(_count_cache_hit)
        return _store


_xla_cache_hits = 0     # JAX's persistent cache hits so far in this process (any thread)


def _count_cache_hit(event: str, **kwargs: Any) -> None:
    global _xla_cache_hits
    if event == "/jax/compilation_cache/cache_hits":
        _xla_cache_hits += 1


def _jaxlib_version() -> str:
    return getattr(jaxlib, "__version__", None) or jaxlib.version.__version__


class StepStore:
    """Serialized executables in one folder: ``<group>/<entry>.exe``, a group per model and
    environment (see ``group``), so a process can prefetch its model's entries."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._ahead: dict[str, _Ahead] = {}     # key -> an entry a prefetch thread is loading
        self._ahead_lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.exe"

    def prefetch(self, group: str, devices: tuple[jax.Device, ...], limit: int = 2) -> threading.Thread | None:
        """Load the group's ``limit`` most recently used entries on a thread, while the caller
        reads weights (a load spends its time in XLA with the GIL released): a one-shot run
        (prefill and decode: two) finds its steps ready. An entry nobody asks for costs that
        thread's time; a server loads the rest itself (``Batcher.preload``)."""
        folder = self.folder / group
        try:
            paths = sorted(folder.glob("*.exe"), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
        except OSError:
            return None
        with self._ahead_lock:
            pending = [(key, self._ahead.setdefault(key, _Ahead())) for key in (f"{group}/{p.stem}" for p in paths)]
        if not pending:
            return None

        def run() -> None:
            for key, ahead in pending:      # a waiter may already have taken it from _ahead
                value = None
                try:
                    value = self._read(key, devices, count_miss=False)
                finally:
                    ahead.resolve(value)

        # Not a daemon: a process that exits while XLA is still loading an entry on a daemon
        # thread aborts in C++ (a one-shot chat did, -6); the interpreter waits for this one.
        thread = threading.Thread(target=run, name="mrs-prefetch-steps", daemon=False)
        thread.start()
        return thread

    def load(self, key: str, devices: tuple[jax.Device, ...], count_miss: bool = True) -> Any | None:
        """The executable stored under ``key``, loaded onto ``devices`` (the ones it was compiled
        for, in order), or None (absent, corrupted: then removed)."""
        with self._ahead_lock:
            ahead = self._ahead.pop(key, None)
        # A prefetched entry's read is final: a damaged one was counted and removed there.
        executable = ahead.wait() if ahead is not None else self._read(key, devices, count_miss)
        if executable is not None:
            STATS["hit"] += 1
        return executable

    def _read(self, key: str, devices: tuple[jax.Device, ...], count_miss: bool) -> Any | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if count_miss:
                STATS["miss"] += 1
            return None
        except OSError as e:
            log.warning("cannot read compiled step %s (%s); compiling it", path, e)
            STATS["miss"] += 1
            return None
        try:
            payload = _checked(data)
            blob, in_tree, out_tree = pickle.loads(payload)
            from jax.experimental.serialize_executable import deserialize_and_load

            # Onto its own devices: by default XLA binds every device of the platform, and an
            # executable for fewer of them aborts the process (a tile count check).
            executable = deserialize_and_load(blob, in_tree, out_tree, backend=devices[0].client,
                                              execution_devices=list(devices))
        except Exception as e:   # any damage: rebuild rather than fail the step
            log.warning("ignoring a damaged compiled step %s (%s); compiling it again", path.name, e)
            STATS["rejected"] += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)       # the most recently used entries are the ones prefetched
        except OSError:
            pass
        return executable

    def save(self, key: str, executable: Any) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            blob, in_tree, out_tree = serialize(executable)
            payload = pickle.dumps((blob, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:   # e.g. an executable with constants XLA cannot serialize
            log.debug("step %s cannot be serialized (%s); it will compile in each process", key, e)
            STATS["unstorable"] += 1
            return
        if compile_cache.write_atomic(self.path(key), MAGIC + hashlib.sha256(payload).digest() + payload):
            STATS["stored"] += 1
        else:
            log.warning("cannot write compiled step to %s", self.path(key).parent)


class _Ahead:
    """One entry a prefetch thread is loading."""

    def __init__(self):
        self._done = threading.Event()
        self._value: Any = None

    def resolve(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def wait(self) -> Any | None:
        self._done.wait()
        return self._value


def _checked(data: bytes) -> bytes:
    head = len(MAGIC) + 32
    if not data.startswith(MAGIC) or len(data) < head:
        raise ValueError("not a compiled step")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        raise ValueError("checksum mismatch")
    return payload


# --- keys ------------------------------------------------------------------------------

_SOURCE_SUFFIXES = (".py", ".cc", ".h")
_digest: str | None = None


def source_digest() -> str:
    """SHA-256 of mrs's own source (any edit to a model, kernel or step is a new key)."""
    global _digest
    if _digest is None:
        package = Path(compile_cache.__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(package.rglob("*")):
            if path.suffix in _SOURCE_SUFFIXES and path.is_file():
                h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
        _digest = h.hexdigest()
    return _digest


def _host_cpu() -> str:
    """The host CPU's model and instruction-set flags: a CPU executable is built for them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return hashlib.sha256("".join(sorted(set(lines))).encode()).hexdigest()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


_CONFIG_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable", "jax_use_shardy_partitioner")


def environment(device: jax.Device) -> str:
    """What an executable compiled for ``device`` in this process depends on, beside its program."""
    flags = []
    for name in _CONFIG_FLAGS:
        try:
            flags.append(f"{name}={getattr(jax.config, name)}")
        except AttributeError:
            flags.append(f"{name}=?")
    parts = [source_digest(), jax.__version__, _jaxlib_version(), device.platform, device.device_kind,
             str(getattr(device.client, "platform_version", "")), str(len(jax.devices(device.platform))),
             os.environ.get("XLA_FLAGS", ""), _host_cpu(), *flags]
    return "\n".join(parts)


def leaf_signature(x: Any) -> tuple:
    """What an executable requires of one argument leaf (its shape, dtype and weak type)."""
    try:
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
    except AttributeError:      # a Python scalar
        return (type(x).__name__,)


def signature(args: tuple) -> tuple:
    """Arguments -> (tree, leaves' signatures): equal exactly when one executable serves both."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (tree, tuple(leaf_signature(x) for x in leaves))


class StoredStep:
    """One jitted step, its executables found by argument shapes: in memory, then in the
    step store, then compiled (and stored).

    The in-memory lookup skips the first argument, the params: every model sharing these
    steps has the same param shapes (``shared_steps`` keys them by graph and config)."""

    def __init__(self, name: str, jitted: Any, device: jax.Device, identity: str | None,
                 describe: Callable[[tuple], str] | None = None, options: str = "",
                 devices: tuple[jax.Device, ...] | None = None):
        """``identity``: the model's (``group``); None keeps the executables in this process.
        ``options``: what else the step's code depends on (e.g. its number of top log-probs).
        ``devices``: all it runs on, in the mesh's order (default: ``device`` alone)."""
        self.name, self.jitted, self.device, self.identity = name, jitted, device, identity
        self.devices = tuple(devices or (device,))
        self.options = options
        self.describe = describe or (lambda args: name)
        self._by_shape: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        key = signature(args[1:])
        executable = self._by_shape.get(key)
        if executable is None:
            executable = self._compiled(key, args)
        return executable(*args)

    def compile(self, *args: Any) -> Any:
        """The executable for these arguments (arrays or jax.ShapeDtypeStructs), ahead of a call."""
        return self._compiled(signature(args[1:]), args)

    def stored(self, *args: Any) -> Any | None:
        """The executable for these arguments if this process or the store has it; never compiles."""
        return self._compiled(signature(args[1:]), args, compile=False)

    def lower(self, *args: Any) -> Any:
        return self.jitted.lower(*args)

    def _cache_size(self) -> int:
        return len(self._by_shape)

    def _compiled(self, key: tuple, args: tuple, compile: bool = True) -> Any | None:
        """Memory, then the step store, then (if ``compile``) XLA; what is found stays in memory."""
        with self._lock:
            executable = self._by_shape.get(key)
            if executable is not None:
                return executable
            steps = store() if self.identity is not None else None
            name = self._store_key(args) if steps is not None else None
            executable = steps.load(name, self.devices, count_miss=compile) if name is not None else None
            if executable is None and compile:
                hits = _xla_cache_hits
                with compile_cache.compiling(self.describe(args)):
                    executable = self.jitted.lower(*args).compile()
                if name is not None and _xla_cache_hits == hits:   # a re-serialized hit would be broken
                    steps.save(name, executable)
                elif name is not None:
                    STATS["unstorable"] += 1
            if executable is not None:
                self._by_shape[key] = executable
            return executable

    def _store_key(self, args: tuple) -> str:
        tree, leaves = signature(args)
        text = io.StringIO()
        for part in (self.name, self.options, str(tree), repr(leaves)):
            text.write(part)
            text.write("\n\0\n")
        return f"{group(self.device, self.identity)}/{hashlib.sha256(text.getvalue().encode()).hexdigest()}"


_groups: dict[tuple, str] = {}


def group(device: jax.Device, identity: str) -> str:
    """The store folder of one model's steps in this environment (``environment`` + identity)."""
    key = (device, identity)
    if key not in _groups:
        _groups[key] = hashlib.sha256(f"{environment(device)}\n\0\n{identity}".encode()).hexdigest()[:32]
    return _groups[key]


def prefetch(device: jax.Device, identity: str | None, devices: tuple[jax.Device, ...] | None = None) -> None:
    """Start loading the model's most recently used steps (see ``StepStore.prefetch``) onto
    ``devices`` (default: ``device`` alone)."""
    steps = store()
    if steps is not None and identity is not None:
        steps.prefetch(group(device, identity), tuple(devices or (device,)))
