"""The process-wide cache of loaded models: load on first use, keep_alive, LRU eviction.

`ModelManager` is driven from one asyncio event loop (the server's). Loading runs in a
worker thread, so requests for models already loaded keep flowing while another one
loads; concurrent requests for the same model share one load. Each causal model gets
a `Batcher` (its decode loop thread); encoder models (embeddings) get none.

keep_alive, per request, in seconds: negative keeps the model loaded forever, 0 unloads
it once no request uses it, otherwise it is unloaded that long after its last use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrs import ollama_store, store
from mrs.engine.batcher import Batcher, ServerBusyError
from mrs.errors import InvalidModelNameError, ModelNotFoundError, MrsError

log = logging.getLogger(__name__)


def resolve_name(home: Path, name: str) -> tuple[str, Path]:
    """A request's model name -> (canonical name, folder); never a path outside ``home``.

    Ollama-style ':latest' tags are accepted and dropped; a name mrs's store does not hold is
    looked up in Ollama's store (``name[:tag]``), whose models are GGUF blobs.
    """
    if not isinstance(name, str):
        raise ModelNotFoundError(f"model {name!r} not found")
    canonical = name.strip()
    canonical = canonical.removesuffix(":latest")
    try:
        path = store.model_dir(home, canonical)
        if not path.is_dir():
            raise ModelNotFoundError(f"model '{name}' not found, try pulling it first")
    except (ModelNotFoundError, InvalidModelNameError):
        found = ollama_store.find(name)        # then Ollama's store, read-only
        if found is None:
            raise
        return found.name, found.gguf
    store.check_model_folder(path)
    return canonical, store.gguf_in(path) or path


@dataclass(eq=False)
class Loaded:
    """A loaded model, its batcher, and its lease bookkeeping."""

    name: str
    path: Path
    model: Any
    batcher: Batcher | None
    load_seconds: float
    info: dict = field(default_factory=dict)
    in_flight: int = 0
    expires_at: float | None = None      # wall-clock epoch; None = never
    keep_alive: float = 300.0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises embedding calls

    @property
    def kind(self) -> str:
        return self.model.family.kind

    @property
    def size_bytes(self) -> int:
        return int(self.info.get("size_bytes") or 0)


class ModelManager:
    """Loads, shares, expires and evicts models for the server."""

    def __init__(self, home: Path, *, device: str = "auto", dtype: str = "auto", max_loaded: int = 2,
                 slots: int = 8, max_context: int = 4096, max_queue: int = 64, default_keep_alive: float = 300.0,
                 loader: Callable[..., Any] | None = None, warmup: bool = True, extra: dict[str, Path] | None = None,
                 load_options: dict[str, Any] | None = None, prefix_reuse: bool = True,
                 adapters: dict[str, Path] | None = None):
        self.home = Path(home)
        self.extra = dict(extra or {})  # operator-given folders outside home (`mrs serve --model ./dir`)
        self.device, self.dtype = device, dtype
        self.load_options = dict(load_options or {})   # quantize / dequantize (Settings.load_options)
        # model name -> the LoRA adapter it is loaded with (`mrs serve --model M --adapter DIR`)
        self.adapters = {self._canonical(name): Path(path) for name, path in (adapters or {}).items()}
        self.max_loaded, self.slots, self.max_context, self.max_queue = max_loaded, slots, max_context, max_queue
        self.default_keep_alive = default_keep_alive
        self.prefix_reuse = prefix_reuse
        self.warmup = warmup
        self._loader = loader
        self._models: dict[str, Loaded] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._reaper: asyncio.Task | None = None
        self.loading = 0  # loads in progress (the /health gauge)

    # ----- leases ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str, keep_alive: float | None = None) -> AsyncIterator[tuple[Loaded, float]]:
        """Hold a model for one request; yields (loaded, seconds spent loading it now)."""
        keep = self.default_keep_alive if keep_alive is None else keep_alive
        loaded, load_seconds = await self.acquire(name)
        loaded.in_flight += 1
        self._touch(loaded, keep)
        try:
            yield loaded, load_seconds
        finally:
            loaded.in_flight -= 1
            self._touch(loaded, keep)
            if keep == 0 and loaded.in_flight == 0:
                await self.unload(loaded.name)

    async def acquire(self, name: str) -> tuple[Loaded, float]:
        """The loaded model for ``name``, loading it (once, off the event loop) if needed."""
        canonical, path = self.resolve(name)
        while True:
            if canonical in self._models:
                loaded = self._models[canonical]
                loaded.last_used = time.monotonic()
                return loaded, 0.0
            pending = self._loading.get(canonical)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            future = asyncio.get_running_loop().create_future()
            self._loading[canonical] = future
            try:
                await self._make_room()
                started = time.perf_counter()
                self.loading += 1
                try:
                    loaded = await asyncio.get_running_loop().run_in_executor(None, self._load, canonical, path)
                finally:
                    self.loading -= 1
                self._models[canonical] = loaded
                future.set_result(None)
                return loaded, time.perf_counter() - started
            except BaseException as e:
                future.set_exception(e if isinstance(e, Exception) else RuntimeError("load cancelled"))
                future.exception()  # mark retrieved: waiters re-raise from their own await
                raise
            finally:
                self._loading.pop(canonical, None)

    def _canonical(self, name: str) -> str:
        try:
            return self.resolve(name)[0]
        except MrsError:
            return name

    def resolve(self, name: str) -> tuple[str, Path]:
        """A request's model name -> (canonical name, folder): operator-given folders, then ``home``."""
        if isinstance(name, str) and name.strip().removesuffix(":latest") in self.extra:
            canonical = name.strip().removesuffix(":latest")
            return canonical, self.extra[canonical]
        return resolve_name(self.home, name)

    def _load(self, name: str, path: Path) -> Loaded:
        """Load weights + tokenizer, start (and warm up) the batcher: runs in a worker thread."""
        import mrs

        loader = self._loader or mrs.load
        started = time.perf_counter()
        options = dict(self.load_options)
        if name in self.adapters:
            options["adapter"] = self.adapters[name]
        model = loader(path, dtype=self.dtype, device=self.device, home=self.home, **options)
        ollama = ollama_store.find(name) if Path(path).is_file() else None
        if ollama is not None and ollama.gguf == Path(path):    # Ollama's defaults come with its models
            model.default_options, model.default_system = ollama.options, ollama.system
        batcher = None
        if model.family.kind == "causal":
            batcher = Batcher(model, slots=self.slots, max_len=self.max_context, max_queue=self.max_queue,
                              prefix_reuse=self.prefix_reuse).start()
            if self.warmup:
                try:
                    batcher.warmup()
                    found = batcher.preload()
                    if found:
                        log.info("%s: prefill for prompts of %s tokens loaded from the compile cache",
                                 name, ", ".join(map(str, found)))
                except BaseException:
                    batcher.close()
                    raise
        try:
            info = store.model_info(path)
        except Exception:  # the summary is cosmetic; never fail a load over it
            log.warning("could not summarise %s", path, exc_info=True)
            info = {"name": name}
        loaded = Loaded(name, path, model, batcher, time.perf_counter() - started, info)
        log.info("loaded %s in %.2fs", name, loaded.load_seconds)
        return loaded

    async def _make_room(self) -> None:
        """Evict least-recently-used idle models until one more fits under max_loaded."""
        while len(self._models) + len(self._loading) > self.max_loaded:
            idle = [m for m in self._models.values() if m.in_flight == 0]
            if not idle:
                raise ServerBusyError(f"{len(self._models)} models are loaded and busy (MRS_MAX_LOADED_MODELS="
                                      f"{self.max_loaded}); retry shortly", retry_after=2)
            victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting %s (least recently used)", victim.name)
            await self.unload(victim.name)

    def _touch(self, loaded: Loaded, keep: float) -> None:
        loaded.last_used = time.monotonic()
        loaded.keep_alive = keep
        loaded.expires_at = None if keep < 0 else time.time() + keep

    async def unload(self, name: str) -> bool:
        """Unload a model now (its running requests get an error); False if it was not loaded."""
        loaded = self._models.pop(name, None)
        if loaded is None:
            return False
        if loaded.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, loaded.batcher.close)
        log.info("unloaded %s", name)
        return True

    def loaded(self) -> list[Loaded]:
        """What is loaded, most recently used first."""
        return sorted(self._models.values(), key=lambda m: -m.last_used)

    def get_loaded(self, name: str) -> Loaded | None:
        return self._models.get(name)

    # ----- lifecycle ---------------------------------------------------------------

    def start(self, interval: float = 1.0) -> None:
        """Start the expiry task on the running loop."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(interval))

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for loaded in list(self._models.values()):
                if loaded.in_flight == 0 and loaded.expires_at is not None and loaded.expires_at <= now:
                    log.info("keep_alive of %s expired", loaded.name)
                    await self.unload(loaded.name)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for name in list(self._models):
            await self.unload(name)
