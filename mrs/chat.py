"""`mrs chat`: a terminal chat with one model.

Each turn goes through an ``mrs.engine.session.ChatSession``, which keeps the KV cache
of the conversation so far, so a turn prefills only its new tokens. Answers stream as
rendered markdown (mrs.render); Ctrl-C stops the answer being written, not the program.
Slash commands manage the conversation; sessions are JSON files (/save, /load,
``--session FILE``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mrs.errors import MrsError
from mrs.render import MarkdownStream

log = logging.getLogger(__name__)

SESSION_VERSION = 1
EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def _nonneg_float(v: str) -> float:
    x = float(v)
    if not x >= 0:
        raise ValueError
    return x


def _unit_float(v: str) -> float:
    x = float(v)
    if not 0 < x <= 1:
        raise ValueError
    return x


def _nonneg_int(v: str) -> int:
    x = int(v)
    if x < 0:
        raise ValueError
    return x


def _pos_int(v: str) -> int:
    x = int(v)
    if x < 1:
        raise ValueError
    return x


def _seed(v: str) -> int | None:
    return None if v.lower() in ("none", "random", "off") else int(v)


# /set KEY VALUE: parser and what the value must be.
OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "temperature": (_nonneg_float, "a number >= 0 (0 is greedy)"),
    "top_p": (_unit_float, "a number in (0, 1]"),
    "top_k": (_nonneg_int, "an integer >= 0 (0 is off)"),
    "min_p": (_nonneg_float, "a number in [0, 1]"),
    "repeat_penalty": (_nonneg_float, "a number > 0 (1 is off)"),
    "max_tokens": (_pos_int, "an integer >= 1"),
    "seed": (_seed, "an integer, or 'none' for random"),
}
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "max_tokens": 1024, "seed": None}

HELP = """\
Type a message and press Enter. Start and end with \"\"\" for several lines.
  /help                 this help
  /clear                forget the conversation (keeps /system)
  /history              show the conversation
  /system [TEXT]        show or set the system message
  /set [KEY VALUE]      show or set an option: temperature, top_p, top_k, min_p,
                        repeat_penalty, max_tokens, seed
  /save FILE            save the conversation (messages, system, options) as JSON
  /load FILE            load a saved conversation
  /model REF            switch to another model (keeps the conversation)
  /exit                 leave (also /bye, Ctrl-D)
Ctrl-C stops an answer; at the prompt it clears the line."""


def parse_option(key: str, value: str) -> Any:
    """'/set key value' -> the typed value, or MrsError saying what it must be."""
    if key not in OPTIONS:
        raise MrsError(f"unknown option {key!r}; options: {', '.join(OPTIONS)}")
    parse, valid = OPTIONS[key]
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise MrsError(f"{key} must be {valid}, got {value!r}") from None


@dataclass
class Conversation:
    """What a chat remembers: the system message, the turns, the sampling options."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))

    def prompt(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def to_json(self, model: str) -> dict:
        return {"version": SESSION_VERSION, "model": model, "system": self.system, "messages": self.messages,
                "options": self.options}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise MrsError(f"{source} is not an mrs chat session (no 'messages' list)")
        messages = []
        for m in data["messages"]:
            if not (isinstance(m, dict) and m.get("role") in ("user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise MrsError(f"{source}: every message needs role user/assistant and text content, got {m!r}")
            messages.append({"role": m["role"], "content": m["content"]})
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise MrsError(f"{source}: 'system' must be text")
        options = dict(DEFAULTS)
        for key, value in (data.get("options") or {}).items():
            options[key] = parse_option(key, "none" if value is None else str(value))
        return cls(system=system, messages=messages, options=options)

    def save(self, path: Path, model: str) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(model), indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> tuple[Conversation, str | None]:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MrsError(f"no session file {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MrsError(f"cannot read session {path}: {e}") from e
        return cls.from_json(data, str(path)), data.get("model")


def _default_session(model: Any) -> Any:
    from mrs.engine.session import ChatSession

    return ChatSession(model)


class Chat:
    """The REPL. ``read`` returns the next input line (None at end of input)."""

    def __init__(self, model: Any, *, load_model: Callable[[str], Any] | None = None,
                 console: Console | None = None, read: Callable[[str], str | None] | None = None,
                 conversation: Conversation | None = None, session_file: Path | None = None,
                 save_on_exit: bool = False, make_session: Callable[[Any], Any] = _default_session,
                 show_stats: bool = False):
        self.console = console or Console(highlight=False)
        self.model, self.load_model, self.make_session = model, load_model, make_session
        self.session = make_session(model)
        self.conversation = conversation or Conversation()
        self.read = read or terminal_reader(self.console)
        self.session_file, self.save_on_exit, self.show_stats = session_file, save_on_exit, show_stats

    # -- output ---------------------------------------------------------------------------

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(f"[{style}]{escape(text)}[/{style}]")

    def error(self, text: str) -> None:
        self.console.print(f"[red]error:[/red] {escape(text)}")

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Read, answer, repeat, until /exit or end of input; returns the exit status."""
        if self.console.is_terminal:
            self.say(f"chatting with {self.model.name} — /help for commands, /exit to leave")
        try:
            while True:
                try:
                    line = self.read(">>> ")
                except KeyboardInterrupt:
                    self.console.print()
                    self.say("(Ctrl-C stops an answer; use /exit or Ctrl-D to leave)")
                    continue
                if line is None:
                    break
                if not self.handle(line):
                    break
        finally:
            if self.save_on_exit and self.session_file:
                self.conversation.save(self.session_file, self.model.name)
                self.say(f"saved the conversation to {self.session_file}")
        return 0

    def handle(self, line: str) -> bool:
        """One input line: a slash command or a message. False means leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            try:
                return self.command(command.lower(), arg.strip())
            except MrsError as e:
                self.error(str(e))
                return True
        self.ask(line)
        return True

    def command(self, command: str, arg: str) -> bool:
        c = self.conversation
        if command in EXIT_COMMANDS:
            return False
        if command in ("/help", "/?"):
            self.console.print(escape(HELP))
        elif command == "/clear":
            c.messages.clear()
            self.session.reset()
            self.say("conversation cleared")
        elif command == "/history":
            for m in c.prompt():
                self.console.print(f"[bold]{m['role']}:[/bold] {escape(m['content'])}")
            if not c.messages:
                self.say("(no messages yet)")
        elif command == "/system":
            if arg:
                c.system = arg
                self.say("system message set")
            else:
                self.say(f"system: {c.system}" if c.system else "no system message")
        elif command == "/set":
            if not arg:
                self.say(", ".join(f"{k}={v}" for k, v in c.options.items()))
                return True
            key, _, value = arg.partition(" ")
            if not value.strip():
                raise MrsError("usage: /set KEY VALUE (e.g. /set temperature 0.2)")
            c.options[key] = parse_option(key, value.strip())
            self.say(f"{key} = {c.options[key]}")
        elif command == "/save":
            if not arg:
                raise MrsError("usage: /save FILE")
            self.say(f"saved {len(c.messages)} messages to {c.save(Path(arg), self.model.name)}")
        elif command == "/load":
            if not arg:
                raise MrsError("usage: /load FILE")
            self.conversation, saved_with = Conversation.load(Path(arg))
            self.session.reset()
            note = f" (saved with {saved_with})" if saved_with and saved_with != self.model.name else ""
            self.say(f"loaded {len(self.conversation.messages)} messages from {arg}{note}")
        elif command == "/model":
            if not arg:
                self.say(f"model: {self.model.name}")
                return True
            if self.load_model is None:
                raise MrsError("this chat cannot switch models")
            self.say(f"loading {arg} ...")
            model = self.load_model(arg)
            self.model, self.session = model, self.make_session(model)
            self.say(f"now chatting with {model.name}")
        else:
            raise MrsError(f"unknown command {command}; /help lists them")
        return True

    def make_room(self) -> int:
        """Drop the oldest turns (never the system message or the newest message) until the
        conversation leaves room for an answer in the session's context, as Ollama's context
        shift does; says so in one dim line. Returns how many messages went."""
        c, session = self.conversation, self.session
        if not hasattr(session, "prompt_tokens"):
            return 0
        limit = session.max_len - min(int(c.options.get("max_tokens") or 1), max(1, session.max_len // 4))
        dropped = 0
        while len(c.messages) > 1 and session.prompt_tokens(c.prompt()) > limit:
            del c.messages[0]
            dropped += 1
            while len(c.messages) > 1 and c.messages[0]["role"] != "user":   # a turn starts with the user
                del c.messages[0]
                dropped += 1
        if dropped:
            self.say(f"(the conversation outgrew the context of {session.max_len} tokens: dropped the "
                     f"{dropped} oldest message{'s' if dropped != 1 else ''})")
        return dropped

    def ask(self, text: str) -> str:
        """One turn: add the user's message, stream the answer, remember it."""
        c = self.conversation
        c.messages.append({"role": "user", "content": text})
        answer, interrupted = "", False
        pieces: Iterator[str] | None = None
        try:
            self.make_room()
            with MarkdownStream(self.console) as out:
                try:
                    pieces = self.session.stream(c.prompt(), **c.options)
                    for piece in pieces:
                        answer += piece
                        out.push(piece)
                except KeyboardInterrupt:
                    interrupted = True
        except MrsError as e:
            c.messages.pop()
            self.session.reset()
            self.error(str(e))
            return ""
        finally:
            if pieces is not None and hasattr(pieces, "close"):
                pieces.close()
        if interrupted:
            self.session.reset()  # the cache was handed to the interrupted step: start the next turn afresh
            self.say("[answer stopped]")
        c.messages.append({"role": "assistant", "content": answer})
        if self.show_stats and not interrupted and getattr(self.session, "last", None) is not None:
            done = self.session.last
            prefilled = self.session.last_prefill_tokens
            self.say(f"{done.completion_tokens} tokens, {done.tokens_per_second:.1f} tok/s; prompt "
                     f"{done.prompt_tokens} tokens: {prefilled} prefilled, {done.prompt_tokens - prefilled} cached")
        if self.console.is_terminal:
            self.console.print()  # a blank line between the answer and the next prompt
        return answer


# ---------------------------------------------------------------------------------------
# Reading input: readline with history on a terminal, plain lines otherwise.
# ---------------------------------------------------------------------------------------

def history_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("mrs")) / "chat_history"


def terminal_reader(console: Console) -> Callable[[str], str | None]:
    """A read function: readline (history, editing) on a terminal, bare lines from a pipe."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline
        except ImportError:  # Windows without pyreadline
            readline = None  # type: ignore[assignment]
        if readline is not None:
            path = history_file()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    readline.read_history_file(path)
                readline.set_history_length(1000)
                import atexit

                atexit.register(_write_history, readline, path)
            except OSError as e:
                log.debug("no chat history: %s", e)

    def read_line(prompt: str) -> str | None:
        try:
            if interactive:
                return input(prompt)
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        except EOFError:
            return None

    def read(prompt: str) -> str | None:
        line = read_line(prompt)
        if line is None or not line.lstrip().startswith('"""'):
            return line
        body = line.lstrip()[3:]      # multi-line: until a line ending with """
        lines = []
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            body = read_line("... ")
            if body is None:
                return "\n".join(lines)
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines).strip("\n")

    return read


def _write_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass
