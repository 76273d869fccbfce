"""Tool calling on the chat routes: what a request asks (tools, tool_choice), how the
prompt carries the tools, and how an answer becomes ``tool_calls``, whole or streamed.

With ``tool_choice`` "auto" the model answers freely and its text is parsed in the
format its template teaches (mrs.tools). A required or named call is decoded under the
schema of that call (``{"name": ..., "arguments": {...}}``, mrs/schema.py), so its
arguments always parse and follow the function's parameters.

Streaming holds back text that may be the start of a call: the whole answer while it
could still open one (formats whose calls start the answer), or, for Hermes' blocks
that may follow some words, any tail that could begin ``<tool_call>``. Held text that
turns out not to be a call is sent as content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mrs.errors import InvalidParameterError
from mrs.server.schemas import UnsupportedFeatureError, get_bool
from mrs.tools import ToolCall, call_schema, check_choice, check_tools, parse_calls, takes_tools, template_format

# What the visible text of an answer starts with when it opens a call, per format (the
# markers of Mistral and Granite are special tokens, which the text does not show).
_OPENINGS = {"llama3": ("{", "<|python_tag|>"), "mistral": ("[", "[TOOL_CALLS]"),
             "granite": ("[", "<|tool_call|>"), "phi4": ("functools", "<|tool_call|>")}
_HERMES = "<tool_call>"


@dataclass
class ToolUse:
    """A request's tools, as checked before the model is loaded; ``bind`` checks them
    against the model's template."""

    tools: list[dict] = field(default_factory=list)
    choice: str = "none"
    parallel: bool = True
    format: str | None = None           # the template's call format, once bound

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def required(self) -> bool:
        return self.active and self.choice != "auto"

    def bind(self, model: Any, name: str, opts: Any) -> list[dict] | None:
        """Check the model takes tools; constrain a required call. Returns the tools to render."""
        if not self.tools:
            return None
        template = getattr(model.tokenizer, "chat_template", None)
        if not takes_tools(template):
            raise UnsupportedFeatureError(f"model '{name}' does not support tools")
        self.format = template_format(template)
        if self.required:
            if opts.format is not None:
                raise InvalidParameterError("response_format", opts.format,
                                            "absent when tool_choice requires a call")
            opts.format = call_schema(self.tools, self.choice)
        return self.tools if self.active else None

    def result(self, model: Any, done: Any) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished choice."""
        if not self.active:
            return done.text, []
        if self.required:
            if done.finish_reason == "length":
                return done.text, []     # cut off before the call closed: what there is, as text
            try:
                value = json.loads(done.text)
                return "", [ToolCall(value["name"], value["arguments"])]
            except (ValueError, KeyError, TypeError):   # the schema should make this unreachable
                return done.text, []
        raw = model.tokenizer.decode(done.token_ids, skip_special_tokens=False)
        content, calls = parse_calls(raw, self.format)
        declared = {t["function"]["name"] for t in self.tools}
        calls = [c for c in calls if c.name in declared][: None if self.parallel else 1]
        return (content, calls) if calls else (done.text, [])

    def stream(self) -> HeldText:
        return HeldText(self)


class HeldText:
    """One streamed choice's text: ``push`` returns what may go out as content now; the rest
    waits for the end, where ``ToolUse.result`` decides."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.text = ""          # everything so far
        self.sent = 0           # how much of it went out as content
        self.holding = use.active

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.holding:
            return self._release(len(self.text))
        if self.use.required:
            return ""
        if self.use.format == "hermes":
            start = self.text.find(_HERMES, self.sent)
            if start >= 0:
                return self._release(start)
            keep = next((k for k in range(min(len(_HERMES) - 1, len(self.text) - self.sent), 0, -1)
                         if _HERMES.startswith(self.text[len(self.text) - k:])), 0)
            return self._release(len(self.text) - keep)
        head = self.text.lstrip()
        if head and not any(o.startswith(head) or head.startswith(o) for o in _OPENINGS[self.use.format]):
            self.holding = False     # it does not open a call: stream it as it comes
            return self._release(len(self.text))
        return ""

    def finish(self, calls: list[ToolCall]) -> str:
        """The content still to send once the answer is complete."""
        return "" if calls else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


def openai_tool_use(body: dict) -> ToolUse:
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (``functions`` is the
    deprecated form and is refused)."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise UnsupportedFeatureError("functions / function_call are deprecated; send tools and tool_choice")
    tools = [] if body.get("tools") is None else check_tools(body["tools"])
    choice = check_choice(body.get("tool_choice"), tools)
    return ToolUse(tools, choice, bool(get_bool(body, "parallel_tool_calls", True)))


def ollama_tool_use(body: dict) -> ToolUse:
    """Ollama's ``tools`` (no tool_choice: the model decides)."""
    tools = [] if body.get("tools") is None else check_tools(body["tools"])
    return ToolUse(tools, "auto" if tools else "none")


def openai_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json()}}
            for c in calls]


def ollama_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def openai_call_deltas(calls: list[ToolCall]) -> list[list[dict]]:
    """Each call as OpenAI streams it: a piece with its index, id, type and name (arguments
    empty), then its arguments."""
    pieces = []
    for i, c in enumerate(calls):
        pieces.append([{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}])
        pieces.append([{"index": i, "function": {"arguments": c.arguments_json()}}])
    return pieces
