"""The Sanic app: Ollama, OpenAI and model-rs routes over the continuous-batching engine.

    build_app(settings) -> Sanic        # routes, errors, auth, CORS, lifecycle
    serve(settings, models, preload)    # blocking; single process (JAX never forks)

`serve` binds the listening socket itself, so port 0 means "any free port": once the
server is up it prints ``mrs serving <home> on http://HOST:PORT`` (stderr) with the
port it got, which is how a test or supervisor learns it without racing for a port.

JAX must not be initialised before a fork, so the server runs single-process and
everything that touches JAX (the model manager and its batchers) is created inside the
serving process by the server's listeners. Each model's decode loop runs in its own
thread and hands tokens to handlers through asyncio queues (`common.Generation`).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from mrs import store
from mrs.config import Settings
from mrs.engine.batcher import ServerBusyError
from mrs.engine.models import ModelManager
from mrs.errors import (
    ContextLengthError,
    InvalidParameterError,
    ModelNotFoundError,
    MrsError,
)
from mrs.server import metrics, native, ollama, openai, openapi
from mrs.server.common import error_response
from mrs.server.schemas import parse_duration

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/health")
_names = itertools.count()


def build_app(settings: Settings, models: Sequence[str] = (), preload: bool = False,
              adapter: Path | None = None, loader: Any = None) -> Sanic:
    """A Sanic app serving ``settings.home``; ``models`` are the defaults (and preloaded with
    ``preload``); ``adapter``, a LoRA adapter folder, is merged into the first of them at load;
    ``loader`` replaces ``mrs.load`` (a group's leader loads on every process: mrs/mirror.py)."""
    name = "mrs" if "mrs" not in Sanic._app_registry else f"mrs_{next(_names)}"
    app = Sanic(name)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # long generations; a disconnect still cancels at once
    app.config.MOTD = False
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.settings = settings
    app.ctx.extra = {}  # `--model ./folder`: served under its folder's name
    app.ctx.default_models = []
    for ref in map(str, models):
        if store.looks_like_path(ref):
            path = store.resolve(ref, settings.home)
            alias = store.model_name(path)
            app.ctx.extra[alias] = path
            app.ctx.default_models.append(alias)
        else:
            app.ctx.default_models.append(ref)
    app.ctx.adapters = {app.ctx.default_models[0]: Path(adapter)} if adapter is not None and models else {}
    app.ctx.default_keep_alive = parse_duration(settings.keep_alive, "MRS_KEEP_ALIVE")
    app.ctx.manager = None
    app.ctx.preloading = False
    app.ctx.origins = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}

    ollama.register(app)
    openai.register(app)
    native.register(app)
    metrics.register(app)
    openapi.register(app)

    app.on_request(_preflight_and_auth)
    app.on_response(_cors)
    app.error_handler.add(Exception, _handle_error)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        s = app.ctx.settings
        app.ctx.manager = ModelManager(s.home, device=s.device, dtype=s.dtype, max_loaded=s.max_loaded_models,
                                       slots=s.max_batch, max_context=s.max_context, max_queue=s.max_queue,
                                       prefix_reuse=s.prefix_reuse,
                                       default_keep_alive=app.ctx.default_keep_alive, extra=app.ctx.extra,
                                       load_options=s.load_options(), adapters=app.ctx.adapters, loader=loader)
        app.ctx.manager.start()
        if preload and app.ctx.default_models:
            app.ctx.preloading = True
            app.add_task(_preload(app), name="mrs-preload")

    @app.before_server_stop
    async def _stop(app: Sanic) -> None:
        if app.ctx.manager is not None:
            await app.ctx.manager.close()

    return app


async def _preload(app: Sanic) -> None:
    """Load (and warm up) the --model models, kept loaded for good; /health is 503 meanwhile."""
    try:
        for name in app.ctx.default_models:
            try:
                async with app.ctx.manager.use(name, keep_alive=-1):
                    pass
            except MrsError as e:
                log.error("could not preload %s: %s", name, e)
    finally:
        app.ctx.preloading = False


def serve(settings: Settings, models: Sequence[str] = (), preload: bool = False, adapter: Path | None = None,
          loader: Any = None) -> None:
    """Run the server until interrupted (blocking, one process; or a group's leader, with ``loader``)."""
    app = build_app(settings, models, preload, adapter=adapter, loader=loader)
    sock = listen(settings.host, settings.port)
    url = address_url(sock)

    @app.after_server_start
    async def _announce(app: Sanic) -> None:
        print(f"mrs serving {settings.home} on {url}", file=sys.stderr, flush=True)

    try:
        app.run(sock=sock, single_process=True, access_log=False, debug=False)
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: one the system picks)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=100)
    except OSError as e:
        raise MrsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def address_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------
# Middleware and errors
# ---------------------------------------------------------------------------------------

ALLOW_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"


async def _preflight_and_auth(request: Request) -> HTTPResponse | None:
    if request.method == "OPTIONS":
        return HTTPResponse(status=204, headers={"Allow": ALLOW_METHODS})
    key = request.app.ctx.settings.api_key
    if key and request.path not in OPEN_PATHS:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return error_response(request, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


def _cors(request: Request, response: HTTPResponse) -> None:
    origins = request.app.ctx.origins
    origin = request.headers.get("origin")
    if not origins or not origin:
        return
    if "*" in origins or origin in origins:
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
        response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "access-control-request-headers", "Authorization, Content-Type")
            response.headers["Access-Control-Max-Age"] = "600"


def _handle_error(request: Request, exception: BaseException) -> HTTPResponse:
    """Every failure -> JSON in the route's dialect with the right status."""
    headers = None
    code = param = None
    if isinstance(exception, MrsError):
        status, message = exception.http_status, str(exception)
        if isinstance(exception, ServerBusyError):
            headers = {"Retry-After": str(exception.retry_after)}
            code = "server_busy"
        elif isinstance(exception, ModelNotFoundError):
            code = "model_not_found"
        elif isinstance(exception, ContextLengthError):
            code = "context_length_exceeded"
        elif isinstance(exception, InvalidParameterError):
            code, param = "invalid_value", exception.name
    elif isinstance(exception, SanicException):
        status = exception.status_code
        message = {404: f"{request.method} {request.path} not found",
                   405: f"method {request.method} not allowed on {request.path}",
                   413: f"request body too large (the limit is {request.app.config.REQUEST_MAX_SIZE} bytes)",
                   }.get(status, str(exception) or "request failed")
        headers = dict(getattr(exception, "headers", None) or {}) or None
    else:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exception)
        status, message = 500, f"internal error: {type(exception).__name__}: {exception}"
    return error_response(request, status, message, code=code, param=param, headers=headers)
