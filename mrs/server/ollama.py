"""Ollama's API (/api/*): generate, chat, embed, tags, show, ps, delete, copy, pull, version.

Shapes follow ollama/ollama docs/api.md as the `ollama` Python client reads them:
NDJSON streams (streaming unless ``stream: false``), integer-nanosecond durations,
RFC3339 times, ``{"error": ...}`` errors (a final error line once a stream began).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

from sanic import Request
from sanic.response import HTTPResponse, text

import mrs
from mrs import ollama_store, store
from mrs.engine.generate import with_default_system
from mrs.engine.models import Loaded, resolve_name
from mrs.errors import InvalidParameterError, MrsError
from mrs.families import resolve as resolve_family
from mrs.server import embeddings
from mrs.server.common import (
    Generation,
    add_route,
    collect,
    dumps,
    json_response,
    now_rfc3339,
    ns,
    require_causal,
    require_tokenizer,
    rfc3339,
    token_text,
)
from mrs.server.schemas import (
    UnsupportedFeatureError,
    get_bool,
    get_int,
    get_model,
    get_str,
    keep_alive,
    ollama_messages,
    ollama_options,
    parse_body,
)
from mrs.server.tool_calls import ToolUse, ollama_calls, ollama_tool_use
from mrs.store import read_json
from mrs.tokenizer import Tokenizer
from mrs.tools import takes_tools

NDJSON = "application/x-ndjson"


def register(app) -> None:
    add_route(app, root, "/", "GET", "HEAD")
    add_route(app, generate, "/api/generate", "POST")
    add_route(app, chat, "/api/chat", "POST")
    add_route(app, embed, "/api/embed", "POST")
    add_route(app, embeddings_legacy, "/api/embeddings", "POST")
    add_route(app, tags, "/api/tags", "GET", "HEAD")
    add_route(app, show, "/api/show", "POST")
    add_route(app, ps, "/api/ps", "GET")
    add_route(app, delete, "/api/delete", "DELETE")
    add_route(app, copy, "/api/copy", "POST")
    add_route(app, pull, "/api/pull", "POST")
    add_route(app, version, "/api/version", "GET")


async def root(request: Request) -> HTTPResponse:
    return text("Ollama is running")


async def version(request: Request) -> HTTPResponse:
    return json_response({"version": mrs.__version__})


# ---------------------------------------------------------------------------------------
# generate / chat
# ---------------------------------------------------------------------------------------

def _check_unsupported(body: dict) -> None:
    if body.get("images"):
        raise UnsupportedFeatureError("this model does not support images")
    think = body.get("think")
    if think not in (None, False):
        raise UnsupportedFeatureError("this model does not support thinking")


def _format(body: dict) -> str | dict | None:
    """Ollama's ``format``: "json" (one JSON object) or a JSON schema (see mrs.schema)."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raise InvalidParameterError("format", fmt, "'json' or a JSON schema object")


def prompt_ids(loaded: Loaded, name: str, prompt: str, *, system: str | None = None, raw: bool = False,
               context: list[int] | None = None) -> list[int]:
    """Ollama's prompt: the chat template around system + prompt (unless raw or none), after
    ``context``; with no ``system``, the model's own (Ollama's system layer), as Ollama does."""
    tokenizer = require_tokenizer(loaded, name)
    if raw or not tokenizer.chat_template:
        ids = tokenizer.encode(prompt, add_special_tokens=not context)
    else:
        if system is None:
            system = getattr(loaded.model, "default_system", None)
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    return list(context or []) + ids


def _context(body: dict) -> list[int] | None:
    value = body.get("context")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidParameterError("context", value, "a list of token ids from an earlier response")
    return value


def _logprobs(model: Any, tokens) -> list[dict]:
    out = []
    for t in tokens:
        entry = {"token": token_text(model, t.id), "logprob": t.logprob}
        if t.top:
            entry["top_logprobs"] = [{"token": token_text(model, i), "logprob": lp} for i, lp in t.top]
        out.append(entry)
    return out


def _stats(completion, load_seconds: float, started: float, queued: float) -> dict:
    return {"done_reason": completion.finish_reason,
            "total_duration": ns(time.perf_counter() - started),
            "load_duration": ns(load_seconds),
            "prompt_eval_count": completion.prompt_tokens - completion.cached_tokens,   # evaluated, not cached
            "prompt_eval_duration": ns(completion.prompt_seconds + queued),
            "eval_count": completion.completion_tokens,
            "eval_duration": ns(completion.decode_seconds)}


async def generate(request: Request) -> HTTPResponse | None:
    body = parse_body(request.body)
    name = get_model(body, "model")
    stream = get_bool(body, "stream", True)
    prompt = get_str(body, "prompt", "")
    system = get_str(body, "system")
    raw = get_bool(body, "raw", False)
    if get_str(body, "template"):
        raise UnsupportedFeatureError("template overrides are not supported; send raw: true with a prompt "
                                      "you formatted yourself")
    if get_str(body, "suffix"):
        raise UnsupportedFeatureError(f"model '{name}' does not support insert (suffix)")
    _check_unsupported(body)
    context = _context(body)
    opts = ollama_options(body)
    opts.format = _format(body)
    keep = keep_alive(body, request.app.ctx.default_keep_alive)
    return await _run(request, name, keep, opts, stream, chat=False,
                      build=lambda loaded: prompt_ids(loaded, name, prompt, system=system, raw=raw, context=context),
                      load_only=not prompt and not context)


async def chat(request: Request) -> HTTPResponse | None:
    body = parse_body(request.body)
    name = get_model(body, "model")
    stream = get_bool(body, "stream", True)
    messages = ollama_messages(body)
    tool_use = ollama_tool_use(body)
    _check_unsupported(body)
    opts = ollama_options(body)
    opts.format = _format(body)
    keep = keep_alive(body, request.app.ctx.default_keep_alive)

    def build(loaded: Loaded) -> list[int]:
        tokenizer = require_tokenizer(loaded, name)
        if not tokenizer.chat_template:
            raise UnsupportedFeatureError(f"model '{name}' has no chat template; use /api/generate with raw: true")
        tools = tool_use.bind(loaded.model, name, opts)
        return tokenizer.encode_chat(with_default_system(loaded.model, messages), tools=tools)

    return await _run(request, name, keep, opts, stream, chat=True, build=build, load_only=not messages,
                      tool_use=tool_use)


async def _run(request: Request, name: str, keep: float, opts, stream: bool, *, chat: bool, build,
               load_only: bool, tool_use: ToolUse | None = None) -> HTTPResponse | None:
    started = time.perf_counter()
    manager = request.app.ctx.manager
    head = {"model": name}
    tool_use = tool_use or ToolUse()

    def piece(content: str, calls=()) -> dict:
        if not chat:
            return {"response": content}
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = ollama_calls(calls)
        return {"message": message}

    if load_only:  # Ollama: an empty prompt / no messages loads (or, with keep_alive 0, unloads) the model
        async with manager.use(name, keep) as (loaded, _):
            require_causal(loaded, name)
        return json_response({**head, "created_at": now_rfc3339(), **piece(""), "done": True,
                              "done_reason": "unload" if keep == 0 else "load"})
    async with manager.use(name, keep) as (loaded, load_seconds):
        require_causal(loaded, name)
        ids = build(loaded)
        gen = Generation(loaded, [ids], opts, request.app.ctx.metrics).start()
        try:
            if not stream:
                result = (await collect(gen))[0]
                done = result["completion"]
                content, calls = tool_use.result(loaded.model, done)
                out = {**head, "created_at": now_rfc3339(), **piece(content, calls), "done": True,
                       **_stats(done, load_seconds, started, result["queued"])}
                if not chat:
                    out["context"] = ids + done.token_ids
                if opts.logprobs:
                    out["logprobs"] = _logprobs(loaded.model, result["tokens"])
                return json_response(out)
            response = await request.respond(content_type=NDJSON)
            held = tool_use.stream(loaded.model.tokenizer)
            try:
                async for _, event in gen.events():
                    text = held.push(event.text, event.ids)
                    if text or event.tokens:
                        chunk = {**head, "created_at": now_rfc3339(), **piece(text), "done": False}
                        if opts.logprobs:
                            chunk["logprobs"] = _logprobs(loaded.model, event.tokens)
                        await response.send(dumps(chunk) + "\n")
                    if event.done is not None:
                        content, calls = tool_use.result(loaded.model, event.done)
                        rest = held.finish(content, calls)
                        if rest or calls:   # Ollama streams the calls in a chunk of their own
                            chunk = {**head, "created_at": now_rfc3339(), **piece(rest, calls), "done": False}
                            await response.send(dumps(chunk) + "\n")
                        final = {**head, "created_at": now_rfc3339(), **piece(""), "done": True,
                                 **_stats(event.done, load_seconds, started, event.queued_seconds)}
                        if not chat:
                            final["context"] = ids + event.done.token_ids
                        await response.send(dumps(final) + "\n")
            except MrsError as e:
                await response.send(dumps({"error": str(e)}) + "\n")
            await response.eof()
            return None
        finally:
            gen.cancel()


# ---------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------

async def embed(request: Request) -> HTTPResponse:
    body = parse_body(request.body)
    name = get_model(body, "model")
    texts = body.get("input", [])
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidParameterError("input", body.get("input"), "a string or a list of strings")
    truncate = get_bool(body, "truncate", True)
    dimensions = get_int(body, "dimensions", None, lo=1)
    keep = keep_alive(body, request.app.ctx.default_keep_alive)
    started = time.perf_counter()
    async with request.app.ctx.manager.use(name, keep) as (loaded, load_seconds):
        vectors, count = await embeddings.run(loaded, texts, truncate=truncate)
    vectors = embeddings.shape(vectors, dimensions, normalize=True)
    return json_response({"model": name, "embeddings": vectors.tolist(),
                          "total_duration": ns(time.perf_counter() - started),
                          "load_duration": ns(load_seconds), "prompt_eval_count": count})


async def embeddings_legacy(request: Request) -> HTTPResponse:
    """The deprecated single-prompt route: the pipeline's vector as is, not L2-normalised
    (Ollama's EmbeddingsHandler returns the runner's output; only /api/embed normalises)."""
    body = parse_body(request.body)
    name = get_model(body, "model")
    prompt = get_str(body, "prompt", "")
    keep = keep_alive(body, request.app.ctx.default_keep_alive)
    async with request.app.ctx.manager.use(name, keep) as (loaded, _):
        if not prompt:
            return json_response({"embedding": []})
        vectors, _ = await embeddings.run(loaded, [prompt])
    return json_response({"embedding": vectors[0].tolist()})


# ---------------------------------------------------------------------------------------
# models: tags, show, ps, delete, copy, pull
# ---------------------------------------------------------------------------------------

def _bare_digest(info: dict) -> str:
    return str(info.get("digest", "")).removeprefix("sha256:")


def _details(info: dict) -> dict:
    family = info.get("family") or info.get("model_type") or "unknown"
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": info.get("parameter_size") or store.human_count(int(info.get("parameters") or 0)),
            "quantization_level": str(info.get("dtype", "unknown")).upper().replace("FLOAT", "F")
            .replace("BFLOAT", "BF")}


def _tag_entry(info: dict) -> dict:
    return {"name": info["name"], "model": info["name"], "modified_at": rfc3339(info.get("modified")),
            "size": int(info.get("size_bytes") or 0), "digest": _bare_digest(info), "details": _details(info)}


def list_infos(home: Path, extra: dict[str, Path] | None = None) -> list[dict]:
    """model_info of every complete model in ``home`` and of the operator's folders (unreadable ones skipped)."""
    infos = []
    for path in store.list_models(home):
        try:
            infos.append(store.model_info(path))
        except MrsError:
            continue
    for name, path in (extra or {}).items():
        try:
            infos.append(store.model_info(path) | {"name": name})
        except MrsError:
            continue
    return infos + [row for row in ollama_store.infos() if "error" not in row]


async def _in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def tags(request: Request) -> HTTPResponse:
    infos = await _in_thread(list_infos, request.app.ctx.settings.home, request.app.ctx.extra)
    return json_response({"models": [_tag_entry(i) for i in infos]})


def _show(manager, name: str) -> dict:
    canonical, path = manager.resolve(name)
    info = store.model_info(path) | {"name": canonical}
    config = read_json(path / "config.json")
    gen_path = path / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    try:
        kind = resolve_family(config)[0].kind
    except MrsError:
        kind = None
    arch = info.get("model_type") or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch, "general.name": canonical,
                                  "general.parameter_count": int(info.get("parameters") or 0),
                                  "general.file_type": info.get("dtype")}
    for key, hf in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                    ("block_count", "num_hidden_layers"), ("attention.head_count", "num_attention_heads"),
                    ("attention.head_count_kv", "num_key_value_heads"), ("feed_forward_length", "intermediate_size"),
                    ("vocab_size", "vocab_size")):
        if isinstance(config.get(hf), (int, float)):
            model_info[f"{arch}.{key}"] = config[hf]
    template, stops = "{{ .Prompt }}", []
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            tok = Tokenizer(path)
            template = tok.chat_template or template
            stops = [tok.eos_token] if tok.eos_token else []
        except MrsError:
            pass
    parameters = [f'{"stop":<30} "{s}"' for s in stops]
    for key, ours in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                      ("repetition_penalty", "repeat_penalty")):
        if isinstance(generation.get(key), (int, float)):
            parameters.append(f"{ours:<30} {generation[key]}")
    capabilities = {"causal": ["completion"], "encoder": ["embedding"]}.get(kind, [])
    if kind == "causal" and takes_tools(template):
        capabilities.append("tools")
    return {"license": "", "modelfile": f"# Modelfile generated by mrs\nFROM {canonical}\n",
            "parameters": "\n".join(parameters), "template": template, "details": _details(info),
            "model_info": model_info, "capabilities": capabilities, "modified_at": rfc3339(info.get("modified"))}


async def show(request: Request) -> HTTPResponse:
    body = parse_body(request.body)
    name = get_model(body, "model", "name")
    return json_response(await _in_thread(_show, request.app.ctx.manager, name))


async def ps(request: Request) -> HTTPResponse:
    manager = request.app.ctx.manager
    out = []
    for loaded in manager.loaded():
        info = loaded.info or {"name": loaded.name}
        on_gpu = loaded.model.runner.on_accelerator
        entry = {"name": loaded.name, "model": loaded.name, "size": loaded.size_bytes,
                 "digest": _bare_digest(info), "details": _details(info), "expires_at": rfc3339(loaded.expires_at),
                 "size_vram": loaded.size_bytes if on_gpu else 0,
                 "context_length": loaded.batcher.max_len if loaded.batcher else loaded.model.context_length,
                 "in_flight": loaded.in_flight,
                 "device": loaded.model.runner.device_name}      # mrs extension: "cpu", "cuda:0", "mlx:gpu"
        if loaded.batcher is not None:
            entry["batch"] = loaded.batcher.stats()  # mrs extension: slots, busy, queued, requests, tokens
        out.append(entry)
    return json_response({"models": out})


async def delete(request: Request) -> HTTPResponse:
    body = parse_body(request.body)
    name = get_model(body, "model", "name")
    home = request.app.ctx.settings.home
    canonical, _ = resolve_name(home, name)
    await request.app.ctx.manager.unload(canonical)
    await _in_thread(store.remove, home, canonical)
    return HTTPResponse(status=200)


async def copy(request: Request) -> HTTPResponse:
    body = parse_body(request.body)
    source = get_model(body, "source")
    destination = get_model(body, "destination")
    home = request.app.ctx.settings.home
    _, source_path = resolve_name(home, source)
    destination = destination.removesuffix(":latest")
    store.validate_name(destination)
    await _in_thread(store.copy, home, source_path, destination)  # a Path: never re-resolved as a name
    return HTTPResponse(status=200)


def _pull_ref(name: str) -> tuple[str, str | None]:
    """A pull's model -> (what hub.pull takes, which is also the pulled model's name; revision).

    As Ollama reads it: ``hf.co/org/repo:Q4_K_M`` (or ``org/repo-GGUF:Q4_K_M``) is one quant
    of a GGUF repo; another ``org/model:tag`` is a branch, tag or commit; ``:latest`` means
    the default branch."""
    from mrs import hub

    bare = store.strip_hub_prefix(name)
    repo, _, tag = bare.partition(":")
    if not repo:
        raise InvalidParameterError("model", name, "a Hugging Face repo id such as 'org/model'")
    if not tag or tag == "latest":
        return hub.repo_id(repo), None
    if bare != name.strip() or repo.lower().endswith("-gguf"):
        repo, quant = hub.split_ref(bare)
        return f"{repo}:{quant}", None
    return hub.repo_id(repo), tag


async def pull(request: Request) -> HTTPResponse | None:
    from mrs import hub

    body = parse_body(request.body)
    name = get_model(body, "model", "name")
    stream = get_bool(body, "stream", True)
    repo, revision = _pull_ref(name)
    settings = request.app.ctx.settings
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()  # set when this handler ends early: the client went away

    def progress(event: dict) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("progress", dict(event)))

    def work() -> None:
        try:
            hub.pull(repo, settings.home, revision=revision, endpoint=settings.mirror or None, on_progress=progress,
                     cancelled=cancelled)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
        except BaseException as e:  # noqa: BLE001 - reported to the client
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    task = loop.run_in_executor(None, work)
    try:
        # Hold back "pulling manifest" until the Hub answered, so a missing repo is still a plain 404.
        held: list[dict] = []
        kind, value = await queue.get()
        while kind == "progress" and value.get("status") == "pulling manifest":
            held.append(value)
            kind, value = await queue.get()
        if kind == "error" or not stream:
            while kind == "progress":
                kind, value = await queue.get()
            await task
            if kind == "error":
                raise value if isinstance(value, MrsError) else MrsError(f"pull failed: {value}")
            await request.app.ctx.manager.unload(repo)
            return json_response({"status": "success"})
        response = await request.respond(content_type=NDJSON)
        for event in held:
            await response.send(dumps(event) + "\n")
        sent_success = False
        while True:
            if kind == "progress":
                sent_success = value.get("status") == "success"
                await response.send(dumps(value) + "\n")
            elif kind == "error":
                await response.send(dumps({"error": str(value)}) + "\n")
                break
            else:
                await request.app.ctx.manager.unload(repo)
                if not sent_success:
                    await response.send(dumps({"status": "success"}) + "\n")
                break
            kind, value = await queue.get()
        await response.eof()
        return None
    finally:
        cancelled.set()  # no-op once the pull has finished; stops it if the client left

