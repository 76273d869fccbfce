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
        if not self.active:   # tool_choice "none": no tools in the prompt, whatever the template takes
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
        return self.tools

    def result(self, model: Any, done: Any) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished choice."""
        if not self.active:
            return done.text, []
        if self.required:
            if done.finish_reason == "length":
                return done.text, []     # cut off before the call closed: what there is, as text
            try:
                value = json.loads(done.text)
                json.dumps(value, allow_nan=False)      # 1e999 parses as inf, which JSON cannot carry
                return "", [ToolCall(value["name"], value["arguments"])]
            except (ValueError, KeyError, TypeError, RecursionError):
                return done.text, []
        raw = model.tokenizer.decode(done.token_ids, skip_special_tokens=False)
        content, calls = parse_calls(raw, self.format)
        declared = {t["function"]["name"] for t in self.tools}
        calls = [c for c in calls if c.name in declared][: None if self.parallel else 1]
        return (content, calls) if calls else (done.text, [])

    def finish_reason(self, calls: list[ToolCall], finish: str) -> str:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required); a call to the
        function the client named is an ordinary "stop"."""
        if not calls:
            return finish
        return "stop" if self.required and self.choice != "required" else "tool_calls"

    def stream(self, tokenizer: Any = None) -> HeldText:
        return HeldText(self, tokenizer)


class HeldText:
    """One streamed choice's text: ``push`` returns what may go out as content now; the rest
    waits for the end, where ``ToolUse.result`` decides.

    Whether text may open a call is judged on the raw text (the ids decoded with special
    tokens), since a format's markers may be special tokens the visible text never shows."""

    def __init__(self, use: ToolUse, tokenizer: Any = None):
        self.use, self.tokenizer = use, tokenizer
        self.ids: list[int] = []
        self.pending = ""        # visible text not yet sent
        self.sent = ""           # visible text sent
        self.holding = use.active
        self.held_all = False    # a call has begun: nothing more goes out until the end

    def raw(self, last: int | None = None) -> str:
        """The text so far with special tokens (its last ``last`` tokens' only, when given)."""
        if self.tokenizer is None:
            return self.sent + self.pending
        return self.tokenizer.decode(self.ids if last is None else self.ids[-last:], skip_special_tokens=False)

    def push(self, piece: str, ids: list[int] = ()) -> str:
        self.pending += piece
        self.ids.extend(ids)
        if not self.holding:
            return self._release(len(self.pending))
        if self.use.required or self.held_all:
            return ""
        if self.use.format == "hermes":
            # The marker is short: the last tokens show it (earlier ones were looked at before),
            # and decoding only them keeps a long answer linear.
            raw = self.raw(last=len(_HERMES) + len(ids) + 4)
            if _HERMES in raw:
                self.held_all = True
                return ""
            # Hold the visible tail that may be the start of "<tool_call>" (when it is text).
            keep = next((k for k in range(min(len(_HERMES) - 1, len(raw)), 0, -1) if _HERMES.startswith(raw[-k:])), 0)
            return self._release(max(0, len(self.pending) - keep))
        head = self.raw().lstrip()   # short while undecided: the opening is a few characters
        openings = _OPENINGS[self.use.format]
        if any(head.startswith(o) for o in openings):
            self.held_all = True     # it opens a call: hold to the end, where result() decides
        elif head and not any(o.startswith(head) for o in openings):
            self.holding = False     # it does not open a call: stream it as it comes
            return self._release(len(self.pending))
        return ""

    def finish(self, content: str, calls: list[ToolCall]) -> str:
        """The content still to send once the answer is complete (``content``: the parsed
        text around the calls, or the whole answer when there are none)."""
        if not calls:
            return self._release(len(self.pending))
        self.pending = ""
        if content.startswith(self.sent):
            return content[len(self.sent):]
        done = self.sent.strip()      # parsed content is stripped
        # (Content that starts with neither is the raw text around the call holding special
        # tokens the stream never showed: what was sent stands, the rest is dropped.)
        return content[len(done):] if content.startswith(done) else ""

    def _release(self, upto: int) -> str:
        out, self.pending = self.pending[:upto], self.pending[upto:]
        self.sent += out
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
