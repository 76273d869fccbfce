"""Tool calling: which format a chat template uses, the calls a model writes in it, and
the schema that constrains a call when the client requires one.

Tools reach the model through its chat template (the ``tools`` variable, as
transformers passes it); what comes back is text in the format the template taught:

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, after any text;
- ``llama3`` (Llama 3.1+): the whole answer is ``{"name": ..., "parameters": {...}}``
  (after ``<|python_tag|>`` at times), several joined by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or in newer
  templates ``[TOOL_CALLS]name[ARGS]{...}`` per call;
- ``granite`` (Granite 3): ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``;
- ``phi4`` (Phi-4-mini): ``functools[{"name": ..., "arguments": {...}}, ...]``.

Every format also takes ``"arguments"`` or ``"parameters"`` and arguments given as a JSON
string. Text that does not parse as calls stays content: a model that writes half a call
has answered in words, not called a tool.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from mrs.errors import InvalidParameterError
from mrs.schema import COMPACT_KEY

FORMATS = ("hermes", "llama3", "mistral", "granite", "phi4")
# What a template mentions when it teaches each format (checked in this order).
_TEMPLATE_MARKS = (("mistral", "[TOOL_CALLS]"), ("hermes", "<tool_call>"), ("granite", "<|tool_call|>"),
                   ("phi4", "<|tool|>"), ("llama3", "<|python_tag|>"), ("llama3", '"parameters"'))
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON: a call holding one could not be sent on (allow_nan=False).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` list (what `/api/show` calls the tools capability)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def template_format(template: str | None) -> str | None:
    """The call format a tools template teaches (None: it takes no tools)."""
    if not takes_tools(template):
        return None
    for name, mark in _TEMPLATE_MARKS:
        if mark in template:
            return name
    return "hermes"     # the most common convention among templates that mention none of the marks


# ---------------------------------------------------------------------------------------
# parsing what the model wrote
# ---------------------------------------------------------------------------------------

def parse_calls(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished answer in format ``fmt``; no calls -> (text, [])."""
    parse = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral, "granite": _granite,
             "phi4": _phi4}.get(fmt)
    if parse is None:
        raise ValueError(f"unknown tool call format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        content, calls = parse(text)
    except (ValueError, RecursionError):     # not a call, or nested past what JSON may hold
        return text, []
    return (content.strip(), calls) if calls else (text, [])


def _call(value: Any) -> ToolCall:
    """A call object (``{"name", "arguments"|"parameters"}``, or OpenAI's ``{"function": ...}``)."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError("not a call")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments, parse_constant=_no_constant) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError("arguments are not an object")
    json.dumps(arguments, allow_nan=False)       # ValueError for 1e999 (inf), which JSON cannot carry
    return ToolCall(value["name"], arguments)


def _json_at(text: str, start: int) -> tuple[Any, int]:
    """The JSON value starting at ``start`` (after whitespace) and where it ends."""
    while start < len(text) and text[start].isspace():
        start += 1
    return _DECODER.raw_decode(text, start)


def _calls_list(value: Any) -> list[ToolCall]:
    return [_call(v) for v in (value if isinstance(value, list) else [value])]


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls, content, at = [], [], 0
    while (start := text.find("<tool_call>", at)) >= 0:
        content.append(text[at:start])
        value, end = _json_at(text, start + len("<tool_call>"))
        calls.append(_call(value))
        close = text.find("</tool_call>", end)
        if close >= 0 and not text[end:close].strip():
            end = close + len("</tool_call>")
        at = end
    content.append(text[at:])
    return "".join(content), calls


def _llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls, at = [], 0
    while at < len(body):
        value, at = _json_at(body, at)
        calls.append(_call(value))
        rest = body[at:].lstrip()
        if not rest:
            break
        if rest[0] != ";":
            raise ValueError("text after a call")
        at = len(body) - len(rest) + 1
    return "", calls


def _mistral(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    content, rest = text[:start], text[start:]
    calls = []
    while rest.startswith("[TOOL_CALLS]"):
        rest = rest[len("[TOOL_CALLS]"):].lstrip()
        if rest.startswith("["):
            value, end = _json_at(rest, 0)
            calls += _calls_list(value)
        else:                                     # name[ARGS]{...}
            name, marker, after = rest.partition("[ARGS]")
            if not marker or not _NAME.fullmatch(name.strip()):
                raise ValueError("not a call")
            arguments, end = _json_at(after, 0)
            calls.append(_call({"name": name.strip(), "arguments": arguments}))
            rest = after
        rest = rest[end:].lstrip()
    if rest:
        raise ValueError("text after the calls")
    return content, calls


def _marked_list(text: str, marker: str, close: str = "") -> tuple[str, list[ToolCall]]:
    start = text.find(marker)
    if start < 0:
        return text, []
    value, end = _json_at(text, start + len(marker))
    rest = text[end:].strip()
    if close and rest.startswith(close):
        rest = rest[len(close):].strip()
    if rest:
        raise ValueError("text after the calls")
    return text[:start], _calls_list(value)


def _granite(text: str) -> tuple[str, list[ToolCall]]:
    return _marked_list(text, "<|tool_call|>")


def _phi4(text: str) -> tuple[str, list[ToolCall]]:
    if "functools" in text:
        return _marked_list(text, "functools")
    return _marked_list(text, "<|tool_call|>", "<|/tool_call|>")


# ---------------------------------------------------------------------------------------
# requests: the tools list, the choice, and the schema a required call follows
# ---------------------------------------------------------------------------------------

def check_tools(value: Any, key: str = "tools") -> list[dict]:
    """A request's ``tools`` -> [{"type": "function", "function": {name, description?, parameters}}]."""
    if not isinstance(value, list):
        raise InvalidParameterError(key, value, "a list of {type: 'function', function: {name, parameters}}")
    out, names = [], set()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidParameterError(f"{key}[{i}]", tool, "{type: 'function', function: {name, parameters}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidParameterError(f"{key}[{i}].function.name", name, "1-64 letters, digits, _ . : -")
        if name in names:
            raise InvalidParameterError(f"{key}[{i}].function.name", name, "a name no other tool has")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidParameterError(f"{key}[{i}].function.parameters", parameters, "a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidParameterError(f"{key}[{i}].function.description", description, "a string")
        entry = {"name": name, "parameters": parameters}
        if description is not None:
            entry["description"] = description
        out.append({"type": "function", "function": entry})
    return out


def check_choice(value: Any, tools: list[dict]) -> str | None:
    """OpenAI's ``tool_choice`` -> "none" | "auto" | "required" | a function's name."""
    names = [t["function"]["name"] for t in tools]
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise InvalidParameterError("tool_choice", value, "'none' or 'auto' when no tools are given")
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        listed = ", ".join(names) or "none"
        raise InvalidParameterError("tool_choice", value, "'none', 'auto', 'required' or {type: 'function', "
                                    f"function: {{name}}}} naming one of the tools ({listed})")
    return name


def call_schema(tools: list[dict], choice: str) -> dict:
    """The JSON schema of one call when ``choice`` is "required" or a function's name.

    A call is ``{"name": <const>, "arguments": <the function's parameters>}``; with several
    tools and "required", any one of those calls (an anyOf the automaton runs branch by
    branch, so the arguments follow the parameters of the name they go with)."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"]["parameters"]},
              "required": ["name", "arguments"]}
             for t in tools if choice in ("required", t["function"]["name"])]
    # Compact: a model writes whitespace between tokens where it has no better idea, and a
    # call's JSON gains nothing from it.
    return {**calls[0], COMPACT_KEY: 1} if len(calls) == 1 else {"anyOf": calls, COMPACT_KEY: 1}
