"""model-rs's own routes: /health, /v1/generate, /v1/generate_stream, /v1/generate_batch.

``model`` is optional here: it defaults to the first ``--model`` given to `mrs serve`,
else the only loaded model, else the only model in the models directory. The prompt
goes through the model's chat template (with ``system``) when it has one, as
`mrs generate` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sanic import Request
from sanic.response import HTTPResponse

from mrs import store
from mrs.errors import InvalidParameterError, MrsError
from mrs.server.common import (
    SSE,
    SSE_HEADERS,
    Generation,
    add_route,
    collect,
    json_response,
    require_causal,
)
from mrs.server.ollama import prompt_ids
from mrs.server.schemas import (
    BadRequestError,
    get_model,
    get_str,
    native_options,
    parse_body,
)


def register(app) -> None:
    add_route(app, health, "/health", "GET", "HEAD")
    add_route(app, generate, "/v1/generate", "POST")
    add_route(app, generate_stream, "/v1/generate_stream", "POST")
    add_route(app, generate_batch, "/v1/generate_batch", "POST")


async def health(request: Request) -> HTTPResponse:
    if request.app.ctx.preloading or request.app.ctx.manager is None:  # on-demand loads keep it "ok"
        return json_response({"status": "loading"}, status=503, headers={"Retry-After": "1"})
    return json_response({"status": "ok"})


def default_model(request: Request, body: dict) -> str:
    name = get_model(body, "model", required=False)
    if name:
        return name
    ctx = request.app.ctx
    if ctx.default_models:
        return ctx.default_models[0]
    loaded = ctx.manager.loaded()
    causal = [m.name for m in loaded if m.batcher is not None]
    if len(causal) == 1:
        return causal[0]
    stored = store.list_models(ctx.settings.home)
    if len(stored) == 1:
        return store.model_name(stored[0])
    raise BadRequestError("model is required (the server has no default model: start it with --model NAME)")


def _prompt(body: dict, key: str = "prompt") -> str:
    return get_str(body, key, None, allow_empty=False) or _missing(key)


def _missing(key: str) -> str:
    raise BadRequestError(f"{key} is required")


def _result(done) -> dict:
    return {"text": done.text, "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens, "cached_tokens": done.cached_tokens}


@asynccontextmanager
async def _generation(request: Request, prompts: list[str] | None = None) -> AsyncIterator[tuple[str, Generation]]:
    """Parse the body, start the request(s) on the model's batcher, cancel whatever is left on exit."""
    body = parse_body(request.body)
    if prompts is None:
        prompts = [_prompt(body)]
    system = get_str(body, "system")
    opts = native_options(body)
    name = default_model(request, body)
    async with request.app.ctx.manager.use(name) as (loaded, _):
        require_causal(loaded, name)
        gen = Generation(loaded, [prompt_ids(loaded, name, p, system=system) for p in prompts], opts, request.app.ctx.metrics).start()
        try:
            yield name, gen
        finally:
            gen.cancel()


async def generate(request: Request) -> HTTPResponse:
    async with _generation(request) as (name, gen):
        done = (await collect(gen))[0]["completion"]
    return json_response({"model": name, **_result(done)})


async def generate_stream(request: Request) -> None:
    async with _generation(request) as (_, gen):
        response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
        sse = SSE(response)
        try:
            async for _, event in gen.events():
                if event.text:
                    await sse.event("token", event.text)
            await sse.event("done", "[DONE]")
        except MrsError as e:
            await sse.event("error", str(e))
        await response.eof()


async def generate_batch(request: Request) -> HTTPResponse:
    prompts = parse_body(request.body).get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InvalidParameterError("prompts", prompts, "a non-empty list of non-empty strings")
    limit = request.app.ctx.settings.max_queue
    if len(prompts) > limit:
        raise InvalidParameterError("prompts", f"{len(prompts)} prompts", f"at most {limit} prompts (MRS_MAX_QUEUE)")
    async with _generation(request, prompts) as (name, gen):
        results = await collect(gen)
    return json_response({"model": name, "results": [_result(results[i]["completion"]) for i in range(len(prompts))]})
