"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Shapes as openai-python reads them: SSE ``data: <json>`` events ending ``data: [DONE]``;
the first chat delta carries the role, later ones only new content, then a delta ``{}``
with finish_reason, then (stream_options.include_usage) a usage chunk with no choices.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any
from urllib.parse import unquote

import numpy as np
from sanic import Request
from sanic.response import HTTPResponse

from mrs import store
from mrs.constrain import token_table
from mrs.engine.generate import with_default_system
from mrs.engine.models import Loaded
from mrs.errors import InvalidParameterError, MrsError
from mrs.server import embeddings
from mrs.server.common import (
    SSE,
    SSE_HEADERS,
    Generation,
    add_route,
    collect,
    json_response,
    require_causal,
    require_tokenizer,
    token_text,
)
from mrs.server.ollama import _in_thread, list_infos
from mrs.server.tool_calls import ToolUse, openai_call_deltas, openai_calls, openai_tool_use
from mrs.server.schemas import (
    BadRequestError,
    UnsupportedFeatureError,
    get_bool,
    get_int,
    get_model,
    get_str,
    openai_messages,
    openai_options,
    parse_body,
)


def register(app) -> None:
    add_route(app, chat_completions, "/v1/chat/completions", "POST")
    add_route(app, completions, "/v1/completions", "POST")
    add_route(app, create_embeddings, "/v1/embeddings", "POST")
    add_route(app, list_models, "/v1/models", "GET")
    add_route(app, get_model_route, "/v1/models/<model_id:path>", "GET")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidParameterError("stream_options", options, "an object such as {'include_usage': true}")
    if not stream:
        raise BadRequestError("stream_options is only allowed with stream: true")
    return bool(get_bool(options, "include_usage", False))


def _usage(prompt_tokens: int, completion_tokens: int, gen: Generation) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}




def _response_format(body: dict, messages: list[dict]) -> str | dict | None:
    """``response_format``: json_object constrains the reply to one JSON object, json_schema
    to its schema (see mrs.schema for the keywords enforced)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidParameterError("response_format", fmt,
                                    "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', ...}")
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidParameterError("response_format.json_schema", spec, "{'name': ..., 'schema': {...}}")
        return spec["schema"]
    if fmt["type"] == "json_object" and not any("json" in m["content"].lower() for m in messages):
        raise BadRequestError("'messages' must contain the word 'json' in some form to use response_format "
                              "of type 'json_object'")
    return "json" if fmt["type"] == "json_object" else None


def _chat_logprobs(model: Any, tokens) -> dict:
    # A token's own bytes, not its decoded text's: a token holding part of a character
    # decodes to U+FFFD, and a client joins the bytes of consecutive tokens to rebuild it.
    pieces = token_table(model.tokenizer, model.vocab_size).pieces if model.tokenizer else []

    def one(token_id: int, logprob: float) -> dict:
        text = token_text(model, token_id)
        piece = pieces[token_id] if 0 <= token_id < len(pieces) else None
        return {"token": text, "logprob": logprob, "bytes": list(piece if piece is not None else text.encode("utf-8"))}

    return {"content": [one(t.id, t.logprob) | {"top_logprobs": [one(i, lp) for i, lp in t.top]} for t in tokens],
            "refusal": None}


def _completion_logprobs(model: Any, tokens, offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = token_text(model, t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({token_text(model, i): lp for i, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# ---------------------------------------------------------------------------------------
# chat completions
# ---------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> HTTPResponse | None:
    body = parse_body(request.body)
    name = get_model(body, "model")
    messages = openai_messages(body)
    opts = openai_options(body, chat=True)
    stream = bool(get_bool(body, "stream", False))
    include_usage = _stream_options(body, stream)
    tool_use = openai_tool_use(body)
    opts.format = _response_format(body, messages)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "system_fingerprint": "mrs"}
    async with request.app.ctx.manager.use(name) as (loaded, _):
        require_causal(loaded, name)
        tokenizer = require_tokenizer(loaded, name)
        if not tokenizer.chat_template:
            raise UnsupportedFeatureError(f"model '{name}' has no chat template; use /v1/completions")
        tools = tool_use.bind(loaded.model, name, opts)
        ids = tokenizer.encode_chat(with_default_system(loaded.model, messages), tools=tools)
        gen = Generation(loaded, [ids], opts, request.app.ctx.metrics).start()
        try:
            if not stream:
                results = await collect(gen)
                choices = []
                for index in sorted(results):
                    done = results[index]["completion"]
                    content, calls = tool_use.result(loaded.model, done)
                    message = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
                    if calls:
                        message["tool_calls"] = openai_calls(calls)
                    choices.append({"index": index, "message": message,
                                    "logprobs": _chat_logprobs(loaded.model, results[index]["tokens"])
                                    if opts.logprobs else None,
                                    "finish_reason": tool_use.finish_reason(calls, done.finish_reason)})
                used = sum(r["completion"].completion_tokens for r in results.values())
                return json_response({**head, "choices": choices, "usage": _usage(len(ids), used, gen)})
            return await _stream_chat(request, loaded, gen, head, opts, include_usage, len(ids), tool_use)
        finally:
            gen.cancel()


async def _stream_chat(request: Request, loaded: Loaded, gen: Generation, head: dict, opts, include_usage: bool,
                       prompt_tokens: int, tool_use: ToolUse) -> None:
    head = {**head, "object": "chat.completion.chunk"}
    response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
    sse = SSE(response)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, tokens=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if opts.logprobs and tokens:
            choice["logprobs"] = _chat_logprobs(loaded.model, tokens)
        return {**head, "choices": [choice], **extra}

    used = 0
    held = {index: tool_use.stream(loaded.model.tokenizer) for index in range(opts.n)}
    try:
        for index in range(opts.n):
            await sse.data(chunk(index, {"role": "assistant", "content": ""}))
        async for index, event in gen.events():
            text = held[index].push(event.text, event.ids)
            if text or event.tokens:
                await sse.data(chunk(index, {"content": text}, tokens=event.tokens))
            if event.done is not None:
                used += event.done.completion_tokens
                content, calls = tool_use.result(loaded.model, event.done)
                rest = held[index].finish(content, calls)
                if rest:
                    await sse.data(chunk(index, {"content": rest}))
                for piece in openai_call_deltas(calls):
                    await sse.data(chunk(index, {"tool_calls": piece}))
                await sse.data(chunk(index, {}, tool_use.finish_reason(calls, event.done.finish_reason)))
        if include_usage:
            await sse.data({**head, "choices": [], "usage": _usage(prompt_tokens, used, gen)})
        await sse.data("[DONE]")
    except MrsError as e:
        await sse.data({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    await response.eof()


# ---------------------------------------------------------------------------------------
# completions
# ---------------------------------------------------------------------------------------

def _prompts(loaded: Loaded, name: str, value: Any) -> list[list[int]]:
    """str | [str] | [int] | [[int]] -> token ids per prompt."""
    tokenizer = require_tokenizer(loaded, name)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidParameterError("prompt", value, "a string, a list of strings, or token ids")
    ids = []
    vocab = loaded.model.vocab_size
    for p in value:
        if isinstance(p, str) and p:
            ids.append(tokenizer.encode(p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in p):
            ids.append(list(p))
        else:
            raise InvalidParameterError("prompt", p, f"a non-empty string or a non-empty list of token ids "
                                                     f"in [0, {vocab})")
    return ids


def _echo_text(loaded: Loaded, prompt: Any, ids: list[int]) -> str:
    return prompt if isinstance(prompt, str) else loaded.model.tokenizer.decode(ids, skip_special_tokens=False)


async def completions(request: Request) -> HTTPResponse | None:
    body = parse_body(request.body)
    name = get_model(body, "model")
    if "prompt" not in body:
        raise BadRequestError("prompt is required")
    opts = openai_options(body, chat=False)
    stream = bool(get_bool(body, "stream", False))
    include_usage = _stream_options(body, stream)
    echo = bool(get_bool(body, "echo", False))
    if get_str(body, "suffix"):
        raise UnsupportedFeatureError("suffix (insertion) is not supported by mrs")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name, "system_fingerprint": "mrs"}
    async with request.app.ctx.manager.use(name) as (loaded, _):
        require_causal(loaded, name)
        ids = _prompts(loaded, name, body["prompt"])
        gen = Generation(loaded, ids, opts, request.app.ctx.metrics).start()
        raw = body["prompt"] if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], (str, list)) \
            else [body["prompt"]]
        prefix = {i: _echo_text(loaded, raw[i // opts.n], ids[i // opts.n]) if echo else ""
                  for i in range(len(ids) * opts.n)}
        prompt_tokens = sum(len(p) for p in ids)
        try:
            if not stream:
                results = await collect(gen)
                choices = []
                for index in sorted(results):
                    done = results[index]["completion"]
                    logprobs = _completion_logprobs(loaded.model, results[index]["tokens"], len(prefix[index])) \
                        if opts.logprobs else None
                    choices.append({"text": prefix[index] + done.text, "index": index, "logprobs": logprobs,
                                    "finish_reason": done.finish_reason})
                used = sum(r["completion"].completion_tokens for r in results.values())
                return json_response({**head, "choices": choices, "usage": _usage(prompt_tokens, used, gen)})
            response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
            sse = SSE(response)
            used = 0
            offsets = {i: len(p) for i, p in prefix.items()}
            try:
                for index, text in prefix.items():
                    if text:
                        await sse.data({**head, "choices": [{"text": text, "index": index, "logprobs": None,
                                                             "finish_reason": None}]})
                async for index, event in gen.events():
                    if event.text or event.tokens or event.done is not None:
                        logprobs = _completion_logprobs(loaded.model, event.tokens, offsets[index]) \
                            if opts.logprobs else None
                        offsets[index] += len(event.text)
                        finish = event.done.finish_reason if event.done is not None else None
                        await sse.data({**head, "choices": [{"text": event.text, "index": index,
                                                             "logprobs": logprobs, "finish_reason": finish}]})
                    if event.done is not None:
                        used += event.done.completion_tokens
                if include_usage:
                    await sse.data({**head, "choices": [], "usage": _usage(prompt_tokens, used, gen)})
                await sse.data("[DONE]")
            except MrsError as e:
                await sse.data({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
            await response.eof()
            return None
        finally:
            gen.cancel()


# ---------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------

async def create_embeddings(request: Request) -> HTTPResponse:
    body = parse_body(request.body)
    name = get_model(body, "model")
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
        raise UnsupportedFeatureError("token-id input is not supported for embeddings; send strings")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidParameterError("input", value, "a non-empty string or a non-empty list of non-empty strings")
    fmt = get_str(body, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidParameterError("encoding_format", fmt, "'float' or 'base64'")
    dimensions = get_int(body, "dimensions", None, lo=1)
    async with request.app.ctx.manager.use(name) as (loaded, _):
        vectors, count = await embeddings.run(loaded, texts)
    vectors = embeddings.shape(vectors, dimensions, normalize=True)
    data = []
    for i, v in enumerate(vectors):
        encoded = base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": count, "total_tokens": count}})


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------

def _model_object(info: dict) -> dict:
    name = info["name"]
    return {"id": name, "object": "model", "created": int(info.get("modified") or 0),
            "owned_by": name.split("/", 1)[0] if "/" in name else "mrs"}


async def list_models(request: Request) -> HTTPResponse:
    infos = await _in_thread(list_infos, request.app.ctx.settings.home, request.app.ctx.extra)
    return json_response({"object": "list", "data": [_model_object(i) for i in infos]})


async def get_model_route(request: Request, model_id: str) -> HTTPResponse:
    name, path = request.app.ctx.manager.resolve(unquote(model_id))  # clients send org%2Fmodel
    return json_response(_model_object(await _in_thread(store.model_info, path) | {"name": name}))

