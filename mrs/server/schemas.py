"""Request parsing and validation: JSON bodies -> typed generation options.

Every check raises an MrsError subclass (400 unless noted), which the app turns into
an error in the route's dialect. Unknown keys are ignored (clients send many); a known
key with a wrong type is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from mrs.errors import InvalidParameterError, MrsError
from mrs.sampling import MAX_NUM_TOP, SamplingParams


class BadRequestError(MrsError):
    """The request body or a field of it is malformed."""


class UnsupportedFeatureError(MrsError):
    """A valid request asks for something mrs does not do (images, tools, templates...)."""


def parse_body(body: bytes | None, *, required: bool = True) -> dict:
    """Raw request bytes -> a JSON object (strict UTF-8, no NaN, an object at the top)."""
    if not body:
        if required:
            raise BadRequestError("missing request body: send a JSON object")
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadRequestError("request body is nested too deeply") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"request body must be a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise BadRequestError(f"request body is not valid JSON: {name} is not a JSON number")


# ---------------------------------------------------------------------------------------
# Field readers
# ---------------------------------------------------------------------------------------

_MISSING = object()


def get_str(body: dict, key: str, default: Any = None, *, allow_empty: bool = True) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, str):
        raise InvalidParameterError(key, value, "a string")
    if not allow_empty and not value:
        raise InvalidParameterError(key, value, "a non-empty string")
    return value


def get_bool(body: dict, key: str, default: Any = None) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(key, value, "true or false")
    return value


def get_int(body: dict, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None) -> Any:
    """An integer (an integral float such as 40.0 counts; bool does not), within [lo, hi]."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    valid = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + \
        (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(key, value, valid)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidParameterError(key, value, valid)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidParameterError(key, value, valid)
    return value


def get_number(body: dict, key: str, default: Any = None) -> Any:
    """A finite real number (not bool); ranges are checked by SamplingParams.make."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidParameterError(key, value, "a finite number")
    return value


def get_stop(body: dict, key: str = "stop") -> tuple[str, ...]:
    """A string or a list of strings (empty strings dropped)."""
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise InvalidParameterError(key, value, "a string or a list of strings")


def get_seed(body: dict, key: str = "seed") -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise InvalidParameterError(key, value, "an integer")
    return int(value)


def get_model(body: dict, *keys: str, required: bool = True) -> str | None:
    """The model name from the first of ``keys`` present (e.g. Ollama's legacy ``name``)."""
    for key in keys:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise InvalidParameterError(key, value, "a model name such as 'org/model'")
            return value.strip()
    if required:
        raise BadRequestError(f"{keys[0]} is required")
    return None


# ---------------------------------------------------------------------------------------
# Generation options
# ---------------------------------------------------------------------------------------

@dataclass
class GenOptions:
    """What every dialect's request boils down to (besides the prompt)."""

    max_tokens: int | None = None          # None: up to the context
    stop: tuple[str, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)   # SamplingParams.make keywords
    logprobs: bool = False
    top_logprobs: int = 0
    context: int | None = None             # Ollama num_ctx: cap on prompt + output
    n: int = 1
    format: str | dict | None = None       # "json" or a JSON schema (constrained decoding)

    def with_defaults(self, defaults: dict | None) -> GenOptions:
        """These options over a model's own defaults (Ollama's params layer): what the request
        leaves unset comes from the model, then from mrs's defaults."""
        if not defaults:
            return self
        given = {k: v for k, v in self.sampling.items() if v is not None}
        picked = {k: v for k, v in sampling_fields(defaults).items() if v is not None}
        stop = self.stop or (get_stop(defaults) if "stop" in defaults else ())
        return dataclasses.replace(self, sampling={**picked, **given}, stop=stop)

    def sampling_row(self, seed_offset: int = 0) -> SamplingParams:
        """The validated one-row SamplingParams (choice ``seed_offset`` of n gets seed + offset)."""
        kwargs = dict(self.sampling)
        if seed_offset and kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + seed_offset
        return SamplingParams.make(**kwargs)


OLLAMA_FLOATS = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
OLLAMA_INTS = ("top_k", "repeat_last_n")


def sampling_fields(source: dict) -> dict[str, Any]:
    """The Ollama-named sampling fields of ``source`` (Ollama ``options`` or a native body)."""
    sampling: dict[str, Any] = {}
    for key in OLLAMA_FLOATS:
        value = get_number(source, key)
        if value is not None:
            sampling[key] = value
    for key in OLLAMA_INTS:
        value = get_int(source, key, lo=-1 if key == "repeat_last_n" else 0)
        if value is not None:
            sampling[key] = value
    sampling["seed"] = get_seed(source)
    return sampling


def ollama_options(body: dict) -> GenOptions:
    """Ollama ``options`` (+ top-level logprobs/top_logprobs) -> GenOptions. Unknown keys are ignored."""
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidParameterError("options", options, "a JSON object")
    sampling = sampling_fields(options)
    num_predict = get_int(options, "num_predict", lo=-2)
    num_ctx = get_int(options, "num_ctx", lo=1)
    logprobs = bool(get_bool(body, "logprobs", False))
    top = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_NUM_TOP)
    opts = GenOptions(max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
                      stop=get_stop(options), sampling=sampling, logprobs=logprobs or top > 0,
                      top_logprobs=top, context=num_ctx)
    opts.sampling_row()  # validate ranges now, so errors come before any work
    return opts


def openai_options(body: dict, *, chat: bool) -> GenOptions:
    """OpenAI chat/completions fields (+ llama.cpp-style top_k, min_p, repeat_penalty) -> GenOptions."""
    sampling: dict[str, Any] = {"temperature": get_number(body, "temperature", 1.0),
                                "top_p": get_number(body, "top_p", 1.0),
                                "top_k": get_int(body, "top_k", 0, lo=0),
                                "min_p": get_number(body, "min_p", 0.0),
                                "presence_penalty": get_number(body, "presence_penalty", 0.0),
                                "frequency_penalty": get_number(body, "frequency_penalty", 0.0),
                                "seed": get_seed(body)}
    repeat = get_number(body, "repeat_penalty")
    if repeat is not None:
        sampling["repeat_penalty"] = repeat
    if isinstance(body.get("temperature"), (int, float)) and not 0 <= body["temperature"] <= 2:
        raise InvalidParameterError("temperature", body["temperature"], "a number in [0, 2]")
    max_tokens = get_int(body, "max_completion_tokens", lo=1) if chat else None
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None if chat else 16, lo=1)
    n = get_int(body, "n", 1, lo=1, hi=16)
    best_of = get_int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise UnsupportedFeatureError("best_of other than n is not supported")
    if chat:
        logprobs = bool(get_bool(body, "logprobs", False))
        top = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_NUM_TOP)
        if top and not logprobs:
            raise BadRequestError("top_logprobs requires logprobs: true")
    else:
        top = get_int(body, "logprobs", None, lo=0, hi=5)
        logprobs, top = top is not None, top or 0
    bias = body.get("logit_bias")
    if bias not in (None, {}):
        raise UnsupportedFeatureError("logit_bias is not supported by mrs")
    opts = GenOptions(max_tokens=max_tokens, stop=get_stop(body), sampling=sampling, logprobs=logprobs,
                      top_logprobs=top, n=n)
    opts.sampling_row()
    return opts


def native_options(body: dict) -> GenOptions:
    """model-rs fields (max_tokens, temperature, top_p, top_k, repeat_penalty, ...) -> GenOptions."""
    sampling = sampling_fields(body)
    fmt = get_str(body, "format")
    if fmt not in (None, "text", "json"):
        raise InvalidParameterError("format", fmt, "'text' or 'json' (one JSON object)")
    opts = GenOptions(max_tokens=get_int(body, "max_tokens", 256, lo=1), stop=get_stop(body), sampling=sampling,
                      format="json" if fmt == "json" else None)
    opts.sampling_row()
    return opts


# ---------------------------------------------------------------------------------------
# keep_alive
# ---------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str = "keep_alive") -> float:
    """Seconds from a number (seconds) or a Go duration string ("5m", "1h30m", "-1", "0")."""
    if isinstance(value, bool) or value is None:
        raise InvalidParameterError(key, value, "a number of seconds or a duration such as '5m'")
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise InvalidParameterError(key, value, "a finite number of seconds")
        return float(value)
    if not isinstance(value, str):
        raise InvalidParameterError(key, value, "a number of seconds or a duration such as '5m'")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, pos = 0.0, 0
    for match in _DURATION_RE.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise InvalidParameterError(key, value, "a number of seconds or a duration such as '5m', '1h30m', '-1'")
    return sign * total


def keep_alive(body: dict, default: float) -> float:
    """The request's keep_alive in seconds (negative: forever; 0: unload after the request)."""
    value = body.get("keep_alive")
    return default if value is None else parse_duration(value)


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")


def _tool_fields(m: dict, i: int, role: str) -> dict:
    """An assistant's ``tool_calls`` (arguments as objects, whichever dialect sent them) and a
    tool result's ``tool_call_id`` / ``tool_name`` (also as ``name``, which templates read)."""
    extra: dict = {}
    calls = m.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list):
            raise InvalidParameterError(f"messages[{i}].tool_calls", calls, "a list of {function: {name, arguments}}")
        extra["tool_calls"] = []
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            where = f"messages[{i}].tool_calls[{j}]"
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidParameterError(where, call, "{function: {name, arguments}}")
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments, parse_constant=_reject_constant) if arguments.strip() else {}
                except (ValueError, RecursionError):
                    raise InvalidParameterError(f"{where}.function.arguments", arguments[:200],
                                                "a JSON object (as a string or an object)") from None
            if not isinstance(arguments, dict):
                raise InvalidParameterError(f"{where}.function.arguments", arguments, "a JSON object")
            entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
            if isinstance(call.get("id"), str):
                entry["id"] = call["id"]
            extra["tool_calls"].append(entry)
    if role == "tool":
        for key in ("tool_call_id", "tool_name", "name"):
            value = m.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidParameterError(f"messages[{i}].{key}", value, "a string")
            if value is not None:
                extra[key] = value
        if "tool_name" in extra:
            extra.setdefault("name", extra["tool_name"])
    return extra


def ollama_messages(body: dict) -> list[dict]:
    """Ollama chat ``messages`` -> [{role, content, ...tool fields}] (images are refused)."""
    messages = body.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise InvalidParameterError("messages", messages, "a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidParameterError(f"messages[{i}]", m, "an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidParameterError(f"messages[{i}].role", role, f"one of {', '.join(ROLES)}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidParameterError(f"messages[{i}].content", content, "a string")
        if m.get("images"):
            raise UnsupportedFeatureError("this model does not support images")
        out.append({"role": role, "content": content, **_tool_fields(m, i, role)})
    return out


def openai_messages(body: dict) -> list[dict]:
    """OpenAI ``messages`` (string or text-part content; 'developer' = system) -> [{role, content, ...}]."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", messages, "a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidParameterError(f"messages[{i}]", m, "an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise InvalidParameterError(f"messages[{i}].role", role, "one of system, developer, user, assistant, tool")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise UnsupportedFeatureError(f"messages[{i}].content part of type {kind!r} is not supported; "
                                                  "send text")
                if not isinstance(part.get("text"), str):
                    raise InvalidParameterError(f"messages[{i}].content[].text", part.get("text"), "a string")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidParameterError(f"messages[{i}].content", content, "a string or a list of text parts")
        out.append({"role": role, "content": content, **_tool_fields(m, i, role)})
    return out
