"""The JSON grammar as a byte-level pushdown automaton (RFC 8259, an object at the top):
the states, the transition function ``feed`` and the constants that mrs.constrain (plain
JSON) and mrs.schema (a schema's automaton, built on this one) both read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

# A state is (mode, stack, extra): mode names what may come next, stack holds the
# open containers ("o" object, "a" array), extra is the mode's own detail.
State = tuple[str, str, Any]
START: State = ("top", "", 0)
MAX_DEPTH = 64
# Consecutive whitespace allowed between tokens: enough for indented output (a newline
# and 16 levels of 4-space indentation), and a model cannot stall in endless newlines.
MAX_WHITESPACE = 65
# Before the value itself only a little: a newline, CR LF, or the word-start space of a
# SentencePiece "▁{" token. A random or confused model otherwise spends a whole short
# budget on blank lines (65 bytes of them) and answers nothing.
MAX_LEADING_WHITESPACE = 2
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
    cap = MAX_LEADING_WHITESPACE if mode == "top" else MAX_WHITESPACE
    return (mode, stack, count + 1) if count < cap else None


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
