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

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from mrs import schema
from mrs.errors import InvalidParameterError, MrsError

# The grammar itself (states, feed, constants) is mrs/json_grammar.py, shared with mrs/schema.py.
from mrs.json_grammar import JSON, START, Grammar, State, feed  # noqa: F401  (re-exported)

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
        constraint = JsonConstraint(table, schema.GRAMMAR, schema.start_state(schema.compile_schema(format)))
    if not constraint.allowed().any():
        raise MrsError(f"the vocabulary of {model.name} has no token that can start this JSON output")
    return constraint
