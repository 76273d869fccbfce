"""JSON Schema as a grammar for constrained decoding (Ollama's ``format: {schema}``,
OpenAI's ``response_format: {"type": "json_schema"}``).

A schema compiles into nodes; the automaton below walks them byte by byte, like
``mrs.constrain.feed`` walks plain JSON, and hands scalar values (strings, numbers,
booleans, null, untyped values) to that plain automaton. Enforced: ``type`` (one or a
list), ``properties`` (only declared keys, each at most once, any order; ``{}`` allows
none), ``required``, ``items``, ``minItems``/``maxItems``, ``maxLength`` (characters; an
escape is one), ``enum``/``const``, and ``anyOf``/``oneOf`` of plain types or of branches
whose values end at a byte of their own (objects, arrays, strings, booleans, null; every
branch runs until the bytes rule it out, so oneOf is held to anyOf). Other keywords
(``pattern``, ``format``, ``minimum``, ``$ref``, ...) are not enforced: such a node accepts
any JSON value of its type; so does an object without ``properties`` (any keys). A number
has at most 40 characters before its exponent and stays below 10^308 (a finite double). A value at the top level that could go on (a number) ends with one whitespace byte; at most ``MAX_LEADING_WHITESPACE`` bytes come
before it, and ``MAX_WHITESPACE`` in any other gap (fewer with ``x-mrs-whitespace``).
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

from mrs.errors import InvalidParameterError
from mrs.json_grammar import (DIGITS, MAX_DEPTH, MAX_LEADING_WHITESPACE, MAX_WHITESPACE, NUMBER_ENDS, WHITESPACE,
                              Grammar, State, feed)

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# mrs's own keyword (JSON Schema lets vendors add them; validators ignore it): the most
# whitespace bytes in any gap inside the value, below MAX_WHITESPACE (tool calls use 1).
COMPACT_KEY = "x-mrs-whitespace"
# A number has at most this many characters before its exponent, and stays below 10^308:
# a finite double (JSON readers turn 1e999 into infinity, which JSON cannot carry on).
MAX_NUMBER_CHARS = 40
_NUMBER_MODES = frozenset({"minus", "zero", "int", "dot", "frac", "e", "esign", "exp"})
ANY = frozenset(TYPES)
VALUE_START: State = ("value", "", 0)


@dataclass(frozen=True)
class Node:
    """One schema position: the value types allowed there and their structure."""

    kinds: frozenset[str]
    properties: tuple[tuple[bytes, int], ...] = ()  # (json-encoded key without its opening quote, node)
    required: frozenset[bytes] = frozenset()
    items: int = 0                                  # node of array items (0 = any value)
    min_items: int = 0
    max_items: int | None = None
    enum: tuple[bytes, ...] | None = None           # json-encoded allowed values
    max_length: int | None = None                   # most characters of a string value
    gap: int = MAX_WHITESPACE                       # most whitespace bytes between its tokens
    branches: tuple[int, ...] = ()                  # anyOf/oneOf of structured branches: their nodes
    closed: bool = False                            # declares ``properties`` (maybe none): only those keys


_NODES: list[Node] = [Node(ANY)]                    # node 0: any JSON value
_COMPILED: dict[str, int] = {}
_LOCK = threading.Lock()


def compile_schema(schema: Any) -> int:
    """The root node of a schema (compiled once per distinct schema)."""
    if not isinstance(schema, dict):
        raise InvalidParameterError("format", schema, "a JSON schema object")
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
        with _LOCK:
            if key not in _COMPILED:
                gap = schema.get(COMPACT_KEY, MAX_WHITESPACE)
                if isinstance(gap, bool) or not isinstance(gap, int) or not 0 <= gap <= MAX_WHITESPACE:
                    raise InvalidParameterError("format", gap, f"an {COMPACT_KEY} from 0 to {MAX_WHITESPACE}")
                _COMPILED[key] = _compile(schema, 0, gap)
            return _COMPILED[key]
    except InvalidParameterError:
        raise
    except (ValueError, TypeError, UnicodeEncodeError) as e:  # NaN/Infinity, lone surrogates, odd values
        raise InvalidParameterError("format", "schema", f"a JSON schema of finite JSON values ({e})") from e


def _add(node: Node) -> int:
    _NODES.append(node)
    return len(_NODES) - 1


def _kinds(schema: dict) -> frozenset[str] | None:
    """The types a schema allows, or None when it is not a plain union of types."""
    kind = schema.get("type")
    if kind is None:
        return frozenset({"object"}) if "properties" in schema else None
    kinds = [kind] if isinstance(kind, str) else kind
    if not isinstance(kinds, list) or not kinds or not all(k in TYPES for k in kinds):
        raise InvalidParameterError("format", kind, f"JSON schema types among {', '.join(TYPES)}")
    return frozenset(kinds)


def _delimited(node: Node) -> bool:
    """Whether every value of a node ends at a byte of its own (not numbers, which end at the
    byte after them): what a branch of a union must be, so each branch knows when it is done."""
    if node.branches:
        return True                                 # made of delimited branches
    if node.enum is not None:
        return all(v[:1] in (b'"', b"{", b"[", b"t", b"f", b"n") for v in node.enum)
    return node.kinds <= {"object", "array", "string", "boolean", "null"}


def _compile(schema: Any, depth: int, gap: int = MAX_WHITESPACE) -> int:
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return 0
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise InvalidParameterError("format", values, "a non-empty JSON schema enum")
        return _add(Node(ANY, enum=tuple(sorted({json.dumps(v, ensure_ascii=False, allow_nan=False).encode()
                                                 for v in values})), gap=gap))
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list) and schema[union]:
            kinds = [_kinds(branch) if isinstance(branch, dict) and set(branch) <= {"type", "description", "title"}
                     else None for branch in schema[union]]
            if all(kinds):
                return _add(Node(frozenset().union(*kinds), gap=gap))
            branches = tuple(_compile(branch, depth + 1, gap) for branch in schema[union])
            if all(b and _delimited(_NODES[b]) for b in branches):
                return _add(Node(ANY, branches=branches, gap=gap))
            return 0
    kinds = _kinds(schema)
    if kinds is None:
        return 0
    properties: list[tuple[bytes, int]] = []
    raw = schema.get("properties")
    if "object" in kinds and isinstance(raw, dict):
        properties = [(json.dumps(name, ensure_ascii=False).encode()[1:], _compile(sub, depth + 1, gap))
                      for name, sub in raw.items()]
    required = schema.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise InvalidParameterError("format", required, "a JSON schema 'required' list of property names")
    names = {p for p, _ in properties}
    wanted = frozenset(json.dumps(r, ensure_ascii=False).encode()[1:] for r in required)
    closed = "object" in kinds and isinstance(raw, dict)
    if closed and not wanted <= names:
        raise InvalidParameterError("format", required, "required properties that are declared in 'properties'")
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    if not isinstance(low, int) or low < 0 or (high is not None and (not isinstance(high, int) or high < low)):
        raise InvalidParameterError("format", (low, high), "0 <= minItems <= maxItems")
    items = _compile(schema.get("items"), depth + 1, gap) if "array" in kinds else 0
    longest = schema.get("maxLength") if "string" in kinds else None
    if longest is not None and (isinstance(longest, bool) or not isinstance(longest, int) or longest < 0):
        raise InvalidParameterError("format", longest, "a JSON schema maxLength of 0 or more")
    return _add(Node(kinds, tuple(properties), wanted, items, low, high, max_length=longest, gap=gap,
                     closed=closed))


# --- the automaton --------------------------------------------------------------------
# A state is (mode, frames, x, ws): frames are the open containers, ("o", node, keys
# seen) or ("a", node, items done); x is the mode's detail; ws counts whitespace.

def _done(frames: tuple) -> tuple:
    if not frames:
        return ("done", (), None, 0)
    kind, node, seen = frames[-1]
    if kind == "a":
        frames = frames[:-1] + (("a", node, seen + 1),)
    return ("after", frames, None, 0)


def _start(frames: tuple, node_id: int, byte: int) -> tuple | None:
    """The first byte of a value of ``node_id``."""
    node = _NODES[node_id]
    if node.branches:  # every branch that can start so runs on, each in its own frames
        return _union(frames, tuple(s for b in node.branches if (s := _start((), b, byte)) is not None))
    if node.enum is not None:
        return _literal(frames, node.enum, byte)
    if len(frames) >= MAX_DEPTH:
        return None
    if byte == ord("{") and "object" in node.kinds and node.closed:
        return ("obj_first", frames + (("o", node_id, frozenset()),), None, 0)
    if byte == ord("[") and "array" in node.kinds:
        return ("arr_first", frames + (("a", node_id, 0),), None, 0)
    kind = {ord("{"): "object", ord('"'): "string", ord("-"): "number", ord("t"): "boolean", ord("f"): "boolean",
            ord("n"): "null"}.get(byte, "number" if byte in DIGITS else None)
    if kind is None or not (kind in node.kinds or (kind == "number" and "integer" in node.kinds)):
        return None
    sub = feed(VALUE_START, byte)
    if sub is None:
        return None
    length = _count_number(_NO_NUMBER, sub[0], byte) if sub[0] in _NUMBER_MODES else (0, 0)
    return ("scalar", frames, (sub, node_id, length), 0)


def _union(frames: tuple, alive: tuple) -> tuple | None:
    """The branches of a union still alive; the union is done when one of them is."""
    if not alive:
        return None
    if any(state[0] == "done" for state in alive):
        return _done(frames)
    return ("union", frames, tuple(dict.fromkeys(alive)), 0)


def _literal(frames: tuple, candidates: tuple[bytes, ...], byte: int) -> tuple | None:
    left = tuple(c[1:] for c in candidates if c[:1] == bytes([byte]))
    if not left:
        return None
    return _done(frames) if left == (b"",) else ("lit", frames, left, 0)


@functools.lru_cache(maxsize=1 << 17)
def schema_feed(state: tuple, byte: int) -> tuple | None:
    """The state after one more byte, or None if no value valid for the schema continues so."""
    mode, frames, x, ws = state
    if mode == "scalar":
        sub, node_id, length = x      # (characters so far, continuation bytes due): maxLength
        integer = "integer" in _NODES[node_id].kinds and "number" not in _NODES[node_id].kinds
        if integer and sub[0] in NUMBER_ENDS and byte in b".eE":
            return None
        nxt = feed(sub, byte)
        if nxt is None:  # a number ends at the first byte that is not part of it
            if sub[0] not in NUMBER_ENDS or sub[1]:
                return None
            # At the top, nothing follows: one whitespace byte ends the number (and the output).
            return _done(frames) if not frames and byte in WHITESPACE else schema_feed(_done(frames), byte)
        if nxt[0] == "done":
            return _done(frames)
        if len(length) == len(_NO_NUMBER):     # a number (a string's count is a pair)
            length = _count_number(length, nxt[0], byte)
            return None if length is None else ("scalar", frames, (nxt, node_id, length), 0)
        longest = _NODES[node_id].max_length
        if longest is not None and sub[0] == "str":
            length = _count_character(length, byte, longest)
            if length is None:
                return None
        return ("scalar", frames, (nxt, node_id, length), 0)
    if mode == "union":
        return _union(frames, tuple(n for state in x if (n := schema_feed(state, byte)) is not None))
    if mode == "lit":
        nxt = _literal(frames, x, byte)
        if nxt is not None:
            return nxt
        if b"" not in x:
            return None
        # "1" of "1" and "12", then a comma (or, at the top, a whitespace byte that ends the output)
        return _done(frames) if not frames and byte in WHITESPACE else schema_feed(_done(frames), byte)
    if mode == "keyname":  # x: (rest of the encoded key, key, value node) for each unseen property
        left = tuple((rest[1:], key, node_id) for rest, key, node_id in x if rest[:1] == bytes([byte]))
        for rest, key, node_id in left:
            if not rest:  # keys end with their closing quote, so no key is a prefix of another
                kind, owner, seen = frames[-1]
                return ("colon", frames[:-1] + ((kind, owner, seen | {key}),), node_id, 0)
        return ("keyname", frames, left, 0) if left else None
    if mode == "done":
        return None
    if byte in WHITESPACE:
        cap = MAX_LEADING_WHITESPACE if not frames else _NODES[frames[-1][1]].gap
        return (mode, frames, x, ws + 1) if ws < cap else None
    if mode == "value":
        return _start(frames, x, byte)
    if mode == "colon":
        return ("value", frames, x, 0) if byte == ord(":") else None
    kind, node_id, seen = frames[-1]
    node = _NODES[node_id]
    if mode in ("obj_first", "key"):
        if byte == ord('"'):
            left = tuple((key, key, n) for key, n in node.properties if key not in seen)
            return ("keyname", frames, left, 0) if left else None
        if mode == "obj_first" and byte == ord("}") and node.required <= seen:
            return _done(frames[:-1])
        return None
    if mode == "arr_first":
        if byte == ord("]") and node.min_items == 0:
            return _done(frames[:-1])
        return _start(frames, node.items, byte) if node.max_items != 0 else None
    if mode == "after":
        if kind == "o":
            if byte == ord(","):
                return ("key", frames, None, 0) if any(p not in seen for p, _ in node.properties) else None
            return _done(frames[:-1]) if byte == ord("}") and node.required <= seen else None
        if byte == ord(","):
            return ("value", frames, node.items, 0) if node.max_items is None or seen < node.max_items else None
        return _done(frames[:-1]) if byte == ord("]") and seen >= node.min_items else None
    raise AssertionError(f"unknown schema automaton mode {mode!r}")


_NO_NUMBER = (0, 0, 1, 0, 0)   # digits before the point, characters before the exponent, its sign, value, digits


def _count_number(length: tuple, mode: str, byte: int) -> tuple | None:
    """One more byte of a number (``mode``: the plain automaton's state after it); None once
    it could only be too long or reach 10^308, which a JSON reader makes infinity. Only
    counts, never the digits: the states repeat, so their token masks stay cached."""
    whole, chars, sign, exponent, exponent_digits = length
    if mode in ("minus", "zero", "int", "dot", "frac"):
        chars += 1
        whole += mode in ("zero", "int")
        if mode == "dot" and chars >= MAX_NUMBER_CHARS:
            return None                       # no room left for the digit a point needs
    elif mode == "esign":
        sign = -1 if byte == ord("-") else 1
    elif mode == "exp":
        exponent, exponent_digits = exponent * 10 + byte - ord("0"), exponent_digits + 1
    if chars > MAX_NUMBER_CHARS or exponent_digits > 3 or (sign > 0 and whole + exponent > 308):
        return None
    return (whole, chars, sign, exponent, exponent_digits)


def _count_character(length: tuple[int, int], byte: int, longest: int) -> tuple[int, int] | None:
    """One more byte of a string body under maxLength: a character is an ASCII byte, an
    escape (from its backslash) or a whole UTF-8 sequence, whose bytes are checked here
    (a stray continuation byte would otherwise be a character that counts for nothing)."""
    count, due = length
    if due:
        return (count, due - 1) if 0x80 <= byte < 0xC0 else None
    due = 0 if byte < 0x80 else 1 if 0xC2 <= byte < 0xE0 else 2 if 0xE0 <= byte < 0xF0 else \
        3 if 0xF0 <= byte < 0xF5 else None
    if due is None or count + 1 > longest:
        return None
    return (count + 1, due)


def start_state(root: int) -> tuple:
    return ("value", (), root, 0)


def in_string(state: tuple) -> bool:
    """Inside a free string body, where quote-free, escape-free bytes never change the state
    (not under a maxLength, where every character counts)."""
    return state[0] == "scalar" and state[2][0][0] == "str" and _NODES[state[2][1]].max_length is None


GRAMMAR = Grammar("schema", schema_feed, in_string)
