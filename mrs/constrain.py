"""Constrained decoding: keep a generation valid JSON by masking, before each sampling
step, every token that could not continue a valid output.

Ollama's ``format: "json"`` and OpenAI's ``response_format: {"type": "json_object"}``
promise a JSON object, not a hope for one. A byte-level pushdown automaton (the JSON
grammar of RFC 8259, an object at the top) follows the text generated so far; a token
is allowed when every one of its bytes can be fed to it. The row finishes ("stop")
the moment the object closes.

The vocabulary is walked as a byte trie, so a state only visits the tokens that start
like something valid, and inside a string a whole subtree of tokens without quotes,
backslashes or control bytes is accepted at once. Masks are cached per automaton
state: a long string body costs one walk, not one per token.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mrs.errors import InvalidParameterError, MrsError

# A state is (mode, stack, extra): mode names what may come next, stack holds the
# open containers ("o" object, "a" array), extra is the mode's own detail.
State = tuple[str, str, Any]
START: State = ("top", "", 0)
MAX_DEPTH = 64
# Consecutive whitespace allowed between tokens: enough for indented output (a newline
# and 16 levels of 4-space indentation), and a model cannot stall in endless newlines.
MAX_WHITESPACE = 65
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# Number modes that may end the number (the next byte belongs to the container).
NUMBER_ENDS = frozenset({"zero", "int", "frac", "exp"})


def _value_done(stack: str) -> State:
    return ("done", "", 0) if not stack else ("after", stack, 0)


def _whitespace(state: State) -> State | None:
    mode, stack, count = state
    return (mode, stack, count + 1) if count < MAX_WHITESPACE else None


def _start_value(stack: str, byte: int) -> State | None:
    """The first byte of a value inside ``stack``."""
    if byte == ord("{"):
        return ("obj_first", stack + "o", 0) if len(stack) < MAX_DEPTH else None
    if byte == ord("["):
        return ("arr_first", stack + "a", 0) if len(stack) < MAX_DEPTH else None
    if byte == ord('"'):
        return ("str", stack, False)
    if byte == ord("-"):
        return ("minus", stack, 0)
    if byte == ord("0"):
        return ("zero", stack, 0)
    if byte in DIGITS:
        return ("int", stack, 0)
    if byte in LITERALS:
        return ("lit", stack, LITERALS[byte])
    return None


def _close(stack: str, byte: int) -> State | None:
    if stack and byte == (ord("}") if stack[-1] == "o" else ord("]")):
        return _value_done(stack[:-1])
    return None


@functools.lru_cache(maxsize=1 << 17)
def feed(state: State, byte: int) -> State | None:
    """The state after one more byte, or None if no valid JSON object continues so."""
    mode, stack, extra = state
    if mode == "str":
        if byte == ord('"'):
            return ("colon", stack, 0) if extra else _value_done(stack)
        if byte == ord("\\"):
            return ("esc", stack, extra)
        return None if byte < 0x20 else state
    if mode == "esc":
        if byte == ord("u"):
            return ("hex", stack, (extra, 4))
        return ("str", stack, extra) if byte in ESCAPES else None
    if mode == "hex":
        is_key, left = extra
        if byte not in HEX:
            return None
        return ("str", stack, is_key) if left == 1 else ("hex", stack, (is_key, left - 1))
    if mode == "lit":
        if byte != extra[0]:
            return None
        return _value_done(stack) if len(extra) == 1 else ("lit", stack, extra[1:])
    if mode in ("minus", "zero", "int", "dot", "frac", "e", "esign", "exp"):
        return _number(state, byte)
    if mode == "done":
        return None
    if byte in WHITESPACE:
        return _whitespace(state)
    if mode == "top":
        return ("obj_first", "o", 0) if byte == ord("{") else None
    if mode == "value":
        return _start_value(stack, byte)
    if mode == "obj_first":
        if byte == ord('"'):
            return ("str", stack, True)
        return _close(stack, byte)
    if mode == "key":
        return ("str", stack, True) if byte == ord('"') else None
    if mode == "colon":
        return ("value", stack, 0) if byte == ord(":") else None
    if mode == "arr_first":
        return _close(stack, byte) or _start_value(stack, byte)
    if mode == "after":
        if byte == ord(","):
            return ("key", stack, 0) if stack[-1] == "o" else ("value", stack, 0)
        return _close(stack, byte)
    raise AssertionError(f"unknown JSON automaton mode {mode!r}")


def _number(state: State, byte: int) -> State | None:
    """JSON numbers: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?"""
    mode, stack, _ = state
    if byte in DIGITS:
        nxt = {"minus": "int" if byte != ord("0") else "zero", "int": "int", "dot": "frac", "frac": "frac",
               "e": "exp", "esign": "exp", "exp": "exp"}.get(mode)
        return (nxt, stack, 0) if nxt else None
    if byte == ord(".") and mode in ("zero", "int"):
        return ("dot", stack, 0)
    if byte in b"eE" and mode in ("zero", "int", "frac"):
        return ("e", stack, 0)
    if byte in b"+-" and mode == "e":
        return ("esign", stack, 0)
    if mode in NUMBER_ENDS:  # the number ended; this byte belongs to its container
        return feed(_value_done(stack), byte)
    return None


class Grammar(NamedTuple):
    """A byte automaton: its transition function and where free string bodies are."""

    name: str
    feed: Callable[[Any, int], Any]
    in_string: Callable[[Any], bool]


JSON = Grammar("json", feed, lambda state: state[0] == "str")


# --- the vocabulary as bytes ------------------------------------------------------------

def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(spec: dict | None) -> set[str]:
    if not spec:
        return set()
    return {spec.get("type", "")} | {t for d in spec.get("decoders") or () for t in _decoder_types(d)}


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes | None]:
    """The bytes each token id stands for; None for special, unused or unknown ids."""
    config = json.loads(tokenizer.hf.to_str())
    decoders = _decoder_types(config.get("decoder"))
    specials = {t["id"] for t in config.get("added_tokens") or () if t.get("special")}
    out: list[bytes | None] = [None] * vocab_size
    byte_level = _byte_level_table() if "ByteLevel" in decoders else None
    for piece, index in tokenizer.hf.get_vocab(with_added_tokens=True).items():
        if index >= vocab_size or index in specials:
            continue
        if byte_level is not None:
            if all(c in byte_level for c in piece):
                out[index] = bytes(byte_level[c] for c in piece)
        elif "ByteFallback" in decoders and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[index] = bytes([int(piece[3:5], 16)])
        elif decoders & {"Metaspace", "Replace", "ByteFallback"}:
            out[index] = piece.replace("\u2581", " ").encode("utf-8")
        else:
            out[index] = tokenizer.hf.decode([index], skip_special_tokens=False).encode("utf-8")
    return [b if b else None for b in out]


class _Node:
    __slots__ = ("children", "ends", "below", "plain")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.ends: list[int] = []             # tokens whose bytes end here
        self.below: np.ndarray | None = None  # every token strictly below this node
        self.plain = True                     # no byte below here can end or escape a string


PLAIN_STRING_BYTES = frozenset(range(0x20, 0x100)) - {ord('"'), ord("\\")}


class TokenTable:
    """A tokenizer's vocabulary as bytes and as a byte trie, with a mask cache per state."""

    def __init__(self, pieces: list[bytes | None]):
        self.pieces = pieces
        self.size = len(pieces)
        self.root = _Node()
        for index, piece in enumerate(pieces):
            if piece is None:
                continue
            node = self.root
            for byte in piece:
                node = node.children.setdefault(byte, _Node())
            node.ends.append(index)
        self._finish(self.root)
        self._masks: OrderedDict[State, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _finish(self, root: _Node) -> None:
        """Fill ``below`` and ``plain`` bottom-up (iteratively: tokens can be long)."""
        order, stack = [], [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):
            ids = [i for child in node.children.values() for i in child.ends]
            parts = [np.asarray(ids, np.int32)] + [c.below for c in node.children.values() if c.below.size]
            node.below = np.concatenate(parts) if len(parts) > 1 else parts[0]
            node.plain = all(b in PLAIN_STRING_BYTES and c.plain for b, c in node.children.items())

    def allowed(self, state: Any, grammar: Grammar | None = None) -> np.ndarray:
        """[vocab] bool: tokens whose bytes the grammar (plain JSON by default) all accepts from ``state``."""
        grammar = grammar or JSON
        key = (grammar.name, state)
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        mask = np.zeros(self.size, bool)
        work = [(self.root, state)]
        while work:
            node, current = work.pop()
            for byte, child in node.children.items():
                nxt = grammar.feed(current, byte)
                if nxt is None:
                    continue
                if child.ends:
                    mask[child.ends] = True
                if child.plain and grammar.in_string(nxt):  # every token below stays in the string
                    mask[child.below] = True
                elif child.children:
                    work.append((child, nxt))
        mask.flags.writeable = False
        with self._lock:
            self._masks[key] = mask
            if len(self._masks) > 512:
                self._masks.popitem(last=False)
        return mask


_TABLES: weakref.WeakKeyDictionary[Any, dict[int, TokenTable]] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def token_table(tokenizer: Any, vocab_size: int) -> TokenTable:
    """The table of a tokenizer, built once (about a second for 100k tokens) and shared."""
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer, {}).get(vocab_size)
    if table is None:
        table = TokenTable(token_bytes(tokenizer, vocab_size))
        with _TABLES_LOCK:
            _TABLES.setdefault(tokenizer, {})[vocab_size] = table
    return table


class JsonConstraint:
    """One request's position in a JSON grammar (plain JSON, or a schema's)."""

    def __init__(self, table: TokenTable, grammar: Grammar | None = None, start: Any = START):
        self.table, self.grammar = table, grammar or JSON
        self.state = start

    @property
    def complete(self) -> bool:
        """The top-level object has closed: nothing more may be generated."""
        return self.state[0] == "done"

    def allowed(self) -> np.ndarray:
        return self.table.allowed(self.state, self.grammar)

    def advance(self, token: int) -> None:
        """Follow a sampled token (it came from ``allowed()``, so it is valid)."""
        piece = self.table.pieces[token] if 0 <= token < self.table.size else None
        state = self.state
        for byte in piece or b"":
            state = self.grammar.feed(state, byte)
            if state is None:
                raise ValueError(f"token {token} ({piece!r}) does not continue valid JSON")
        self.state = state


def constraint_for(model: Any, format: Any) -> JsonConstraint | None:
    """The constraint a request's ``format`` asks for: None (free text), "json" (one
    JSON object) or a JSON schema (a dict; see mrs.schema for what it enforces)."""
    if format in (None, "", "text"):
        return None
    if format != "json" and not isinstance(format, dict):
        raise InvalidParameterError("format", format, "'json' (one JSON object), a JSON schema, or None")
    if model.tokenizer is None:
        raise MrsError(f"model {model.name} has no tokenizer.json, so its output cannot be constrained to JSON")
    table = token_table(model.tokenizer, model.vocab_size)
    if format == "json":
        constraint = JsonConstraint(table)
    else:
        from mrs import schema

        constraint = JsonConstraint(table, schema.GRAMMAR, schema.start_state(schema.compile_schema(format)))
    if not constraint.allowed().any():
        raise MrsError(f"the vocabulary of {model.name} has no token that can start this JSON output")
    return constraint
