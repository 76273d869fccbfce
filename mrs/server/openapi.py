"""`/openapi.json`: an OpenAPI 3.0 description of the routes mrs serves.

Written by hand from the handlers' own checks (mrs/server/schemas.py), so a client
generator or a fuzzer (the tests run schemathesis against it) sees what the server
accepts. Request bodies list the fields each route reads; the server ignores fields it
does not know, as Ollama and OpenAI do, and answers anything else with a 4xx JSON error.
"""

from __future__ import annotations

from typing import Any

from sanic import Request
from sanic.response import HTTPResponse

import mrs

STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
TEXT_OR_LIST = {"oneOf": [STRING, {"type": "array", "items": STRING}]}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [STRING, {"type": "array", "items": {"type": "object"}}], "nullable": True},
    "tool_calls": {"type": "array", "items": {"type": "object"}},
    "tool_call_id": STRING, "tool_name": STRING, "name": STRING}}
TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": STRING, "description": STRING, "parameters": {"type": "object"}}}}}
OLLAMA_OPTIONS = {"type": "object", "properties": {
    "temperature": NUMBER, "top_k": INTEGER, "top_p": NUMBER, "min_p": NUMBER, "num_predict": INTEGER,
    "repeat_penalty": NUMBER, "repeat_last_n": INTEGER, "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
    "seed": INTEGER, "stop": TEXT_OR_LIST, "num_ctx": INTEGER}}
SAMPLING = {"temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "min_p": NUMBER, "seed": INTEGER,
            "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "repeat_penalty": NUMBER,
            "stop": TEXT_OR_LIST, "max_tokens": INTEGER, "n": INTEGER, "stream": BOOLEAN,
            "logprobs": BOOLEAN, "top_logprobs": INTEGER}


def _body(required: list[str], properties: dict[str, Any]) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:   # OpenAPI 3.0 wants a non-empty list or none
        schema["required"] = required
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answers(description: str, media: str = "application/json") -> dict:
    error = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return {"200": {"description": description, "content": {media: {"schema": {}}}},
            "400": {"description": "the request is not valid", **error},
            "404": {"description": "no such model", **error},
            "503": {"description": "busy (Retry-After) or loading", **error}}


def _operation(summary: str, body: dict | None = None, media: str = "application/json") -> dict:
    operation = {"summary": summary, "responses": _answers(summary, media)}
    if body is not None:
        operation["requestBody"] = body
    return operation


def document() -> dict:
    """The OpenAPI document (3.0.3) of every route."""
    model = {"model": STRING}
    ollama_generate = _body([], {**model, "prompt": STRING, "suffix": STRING, "system": STRING, "template": STRING,
                                 "raw": BOOLEAN, "format": {"oneOf": [STRING, {"type": "object"}]},
                                 "options": OLLAMA_OPTIONS, "keep_alive": {"oneOf": [STRING, NUMBER]},
                                 "stream": BOOLEAN, "context": {"type": "array", "items": INTEGER}})
    ollama_chat = _body([], {**model, "messages": {"type": "array", "items": MESSAGE},
                             "tools": {"type": "array", "items": TOOL}, "format": {"oneOf": [STRING, {"type": "object"}]},
                             "options": OLLAMA_OPTIONS, "keep_alive": {"oneOf": [STRING, NUMBER]}, "stream": BOOLEAN})
    openai_chat = _body(["model", "messages"], {**model, **SAMPLING, "messages": {"type": "array", "items": MESSAGE},
                                                "max_completion_tokens": INTEGER,
                                                "tools": {"type": "array", "items": TOOL},
                                                "tool_choice": {"oneOf": [STRING, {"type": "object"}]},
                                                "parallel_tool_calls": BOOLEAN,
                                                "response_format": {"type": "object"},
                                                "stream_options": {"type": "object"}})
    openai_completion = _body(["model", "prompt"], {**model, **SAMPLING, "echo": BOOLEAN, "suffix": STRING,
                                                    "prompt": {"oneOf": [STRING, {"type": "array"}]},
                                                    "stream_options": {"type": "object"}})
    native = _body(["prompt"], {**model, "prompt": STRING, "system": STRING, "max_tokens": INTEGER,
                                "temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "repeat_penalty": NUMBER,
                                "seed": INTEGER, "stop": TEXT_OR_LIST})
    paths = {
        "/": {"get": _operation("the banner", media="text/plain")},
        "/health": {"get": _operation("ok, or 503 while a model loads")},
        "/metrics": {"get": _operation("Prometheus text exposition", media="text/plain")},
        "/openapi.json": {"get": _operation("this document")},
        "/api/version": {"get": _operation("the version")},
        "/api/tags": {"get": _operation("the models")},
        "/api/ps": {"get": _operation("the loaded models")},
        "/api/show": {"post": _operation("a model's details", _body([], {**model, "name": STRING}))},
        "/api/generate": {"post": _operation("complete a prompt (NDJSON when streaming)", ollama_generate)},
        "/api/chat": {"post": _operation("answer a conversation (NDJSON when streaming)", ollama_chat)},
        "/api/embed": {"post": _operation("embed texts", _body(["model"], {
            **model, "input": TEXT_OR_LIST, "truncate": BOOLEAN, "dimensions": INTEGER}))},
        "/api/embeddings": {"post": _operation("embed a text (legacy)", _body(["model"], {**model, "prompt": STRING}))},
        "/api/copy": {"post": _operation("copy a model", _body(["source", "destination"], {
            "source": STRING, "destination": STRING}))},
        "/api/delete": {"delete": _operation("delete a model", _body([], {**model, "name": STRING}))},
        "/api/pull": {"post": _operation("pull a model (NDJSON progress)", _body([], {
            **model, "name": STRING, "stream": BOOLEAN, "insecure": BOOLEAN}))},
        "/v1/chat/completions": {"post": _operation("OpenAI chat (SSE when streaming)", openai_chat)},
        "/v1/completions": {"post": _operation("OpenAI completion (SSE when streaming)", openai_completion)},
        "/v1/embeddings": {"post": _operation("OpenAI embeddings", _body(["model", "input"], {
            **model, "input": TEXT_OR_LIST, "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": INTEGER}))},
        "/v1/models": {"get": _operation("OpenAI model list")},
        "/v1/models/{model_id}": {"get": {**_operation("one model"), "parameters": [
            {"name": "model_id", "in": "path", "required": True, "schema": STRING}]}},
        "/v1/generate": {"post": _operation("mrs: one completion", native)},
        "/v1/generate_stream": {"post": _operation("mrs: one completion as SSE", native, "text/event-stream")},
        "/v1/generate_batch": {"post": _operation("mrs: several completions", _body(["prompts"], {
            **{k: v for k, v in native["content"]["application/json"]["schema"]["properties"].items()
               if k != "prompt"}, "prompts": {"type": "array", "items": STRING}}))},
    }
    return {"openapi": "3.0.3", "info": {"title": "mrs", "version": mrs.__version__,
                                         "description": "Ollama's /api/*, OpenAI's /v1/*, and mrs's own routes"},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}], "paths": paths}


async def openapi_route(request: Request) -> HTTPResponse:
    from mrs.server.common import json_response

    return json_response(document())


def register(app) -> None:
    from mrs.server.common import add_route

    add_route(app, openapi_route, "/openapi.json", "GET")
