"""What every route module shares: JSON out, errors in each dialect, timestamps, and
`Generation`, the bridge from the batcher thread to a request handler's event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from sanic import Request
from sanic.response import HTTPResponse

from mrs.engine.batcher import Event
from mrs.engine.batcher import Request as BatchRequest
from mrs.engine.models import Loaded
from mrs.errors import MrsError
from mrs.server.schemas import GenOptions

OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models")


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 text as is (no NaN: JSON has none)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(dumps(value), status=status, headers=headers, content_type="application/json")


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}


def error_response(request: Request | None, status: int, message: str, *, code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> HTTPResponse:
    """``{"error": message}`` (Ollama, model-rs) or ``{"error": {message, type, param, code}}`` (OpenAI)."""
    if request is not None and is_openai(request.path):
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body: dict = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return json_response(body, status=status, headers=headers)


def now_rfc3339() -> str:
    return rfc3339(time.time())


def rfc3339(epoch: float | None) -> str:
    """Epoch seconds -> '2024-05-01T12:00:00.123456Z'; None (never) -> a far-future date."""
    if epoch is None:
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    """Seconds -> integer nanoseconds (Ollama's durations)."""
    return max(0, int(seconds * 1e9))


def token_text(model: Any, token_id: int) -> str:
    """One token as text, special tokens included (for logprobs)."""
    return model.tokenizer.decode([int(token_id)], skip_special_tokens=False) if model.tokenizer else str(token_id)


def require_causal(loaded: Loaded, name: str) -> None:
    if loaded.batcher is None:
        raise MrsError(f"model '{name}' is an {loaded.kind} model: it embeds text but cannot generate; "
                       "use /api/embed or /v1/embeddings")


def require_tokenizer(loaded: Loaded, name: str):
    tokenizer = loaded.model.tokenizer
    if tokenizer is None:
        raise MrsError(f"model '{name}' has no tokenizer.json, so it cannot take text")
    return tokenizer


class Inbox:
    """Hands items from other threads to asyncio queues of one loop, one wake-up per batch.

    A decode step emits to every running request at once; waking the event loop once per
    step rather than once per request keeps its overhead flat as concurrency grows.
    """

    _by_loop: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Inbox:
        inbox = cls._by_loop.get(loop)
        if inbox is None:
            inbox = cls._by_loop[loop] = cls(loop)
        return inbox

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:
                return  # a flush is already scheduled
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class Generation:
    """Requests on one model's batcher, read back on the event loop as (index, Event).

    Choice ``j`` of prompt ``p`` has index ``p * n + j`` and seed ``seed + j``. Closing
    (or leaving the handler by any path, a client disconnect included) cancels whatever
    is still running, which frees its slot at the batcher's next step.
    """

    def __init__(self, loaded: Loaded, prompts: Sequence[Sequence[int]], opts: GenOptions, metrics: Any = None):
        opts = opts.with_defaults(getattr(loaded.model, "default_options", None))
        self.loaded, self.opts, self.metrics = loaded, opts, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests: list[BatchRequest] = []
        self.prompt_tokens = [len(ids) for ids in prompts]
        for p, ids in enumerate(prompts):
            for j in range(opts.n):
                index = p * opts.n + j
                self.requests.append(BatchRequest(
                    list(ids), self._sink(index), opts.sampling_row(seed_offset=j),
                    max_tokens=opts.max_tokens if opts.max_tokens is not None else 1 << 30, stop=opts.stop,
                    logprobs=opts.logprobs, top_logprobs=opts.top_logprobs, context=opts.context,
                    format=opts.format))
        self.remaining = len(self.requests)
        self.started = time.perf_counter()
        self._cached: dict[int, int] = {}   # prompt -> the most of its tokens any choice reused

    def _sink(self, index: int):
        inbox, queue = Inbox.of(self.loop), self.queue

        def sink(event: Event) -> None:
            inbox.put(queue, (index, event))
        return sink

    def start(self) -> Generation:
        """Submit every request; on a refusal (busy, too long) cancel those already in and raise."""
        batcher = self.loaded.batcher
        try:
            for request in self.requests:
                batcher.submit(request)
        except BaseException:
            self.cancel()
            raise
        return self

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Each request's events in order; raises the first request error."""
        while self.remaining:
            index, event = await self.queue.get()
            if event.error is not None:
                self.remaining = 0
                self.cancel()
                raise event.error if isinstance(event.error, MrsError) else MrsError(str(event.error))
            if event.done is not None:
                self.remaining -= 1
                prompt = index // self.opts.n
                self._cached[prompt] = max(self._cached.get(prompt, 0), event.done.cached_tokens)
                if self.metrics is not None:
                    self.metrics.completion(self.loaded.name, event.done, event.queued_seconds)
                    if not self.remaining:
                        self.metrics.generation(self.loaded.name, time.perf_counter() - self.started)
            yield index, event

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens taken from the cache, over the prompts finished so far (each prompt
        counted once, as its prompt tokens are, at the most any of its choices reused)."""
        return sum(self._cached.values())

    def cancel(self) -> None:
        for request in self.requests:
            if not request.cancelled:
                self.loaded.batcher.cancel(request)


async def collect(gen: Generation) -> dict[int, dict]:
    """Run a generation to the end: index -> {"completion", "tokens", "queued"}."""
    out: dict[int, dict] = {}
    async for index, event in gen.events():
        slot = out.setdefault(index, {"tokens": [], "completion": None, "queued": 0.0})
        slot["tokens"].extend(event.tokens)
        if event.done is not None:
            slot["completion"], slot["queued"] = event.done, event.queued_seconds
    return out


class SSE:
    """Server-sent events on a streaming response."""

    def __init__(self, response):
        self.response = response

    async def data(self, value: Any) -> None:
        await self.response.send(f"data: {value if isinstance(value, str) else dumps(value)}\n\n")

    async def event(self, name: str, text: str) -> None:
        lines = "".join(f"data: {line}\n" for line in text.split("\n"))
        await self.response.send(f"event: {name}\n{lines}\n")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def add_route(app, handler, path: str, *methods: str) -> None:
    """Register a route; OPTIONS too, so CORS preflights reach the middleware."""
    app.add_route(handler, path, methods=[*methods, "OPTIONS"], name=f"{handler.__module__}.{handler.__name__}"
                  .replace(".", "_"))
