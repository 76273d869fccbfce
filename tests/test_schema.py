"""JSON-schema-constrained decoding: instances of a schema are accepted, violations are
not, and token walks under the masks only ever write schema-valid JSON."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mrs
from mrs.constrain import JsonConstraint, token_table
from mrs.errors import InvalidParameterError
from mrs.schema import GRAMMAR, compile_schema, schema_feed, start_state

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "kind": {"enum": ["a", "b", 1, 12, None]},
        "score": {"type": ["number", "null"]},
        "home": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        "extra": {},
    },
    "required": ["name", "age"],
}


def run(text: bytes, schema=PERSON):
    state = start_state(compile_schema(schema))
    for byte in text:
        state = schema_feed(state, byte)
        if state is None:
            return None
    return state


def valid(value, schema=PERSON) -> bool:
    """A small reference validator for the keywords PERSON uses."""
    if "enum" in schema:
        return any(value == e and type(value) is type(e) for e in schema["enum"])
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "null": lambda v: v is None}
    if kinds and not any(checks[k](value) for k in kinds):
        return False
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return (set(value) <= set(props) and set(schema.get("required", ())) <= set(value)
                and all(valid(v, props[k]) for k, v in value.items()))
    if isinstance(value, list) and "items" in schema:
        return len(value) <= schema.get("maxItems", len(value)) and all(valid(v, schema["items"]) for v in value)
    return True


scalars = st.none() | st.booleans() | st.integers(-999, 999) | st.text(max_size=6)
person = st.fixed_dictionaries(
    {"name": st.text(max_size=10), "age": st.integers(-10**9, 10**9)},
    optional={"tags": st.lists(st.text(max_size=5), max_size=3), "kind": st.sampled_from(["a", "b", 1, 12, None]),
              "score": st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
              "home": st.fixed_dictionaries({"ok": st.booleans()}),
              "extra": st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                                    c, max_size=3),
                                    max_leaves=6)})


@settings(max_examples=300, deadline=None)
@given(person, st.randoms(use_true_random=False), st.sampled_from([None, 2]))
def test_every_instance_is_accepted_in_any_key_order(value, rng, indent):
    items = list(value.items())
    rng.shuffle(items)
    text = json.dumps(dict(items), indent=indent, ensure_ascii=False).encode()
    state = run(text)
    assert state is not None and state[0] == "done", text


@pytest.mark.parametrize("text", [
    b'{"age": 3}',                                   # name is required
    b'{"name": "x", "age": "3"}',                    # age is an integer
    b'{"name": "x", "age": 3.5}',
    b'{"name": "x", "age": 1e3}',
    b'{"name": "x", "age": 3, "nick": "y"}',         # not a declared property
    b'{"name": "x", "name": "y", "age": 3}',         # a key twice
    b'{"name": "x", "age": 3, "tags": ["a", "b", "c", "d"]}',
    b'{"name": "x", "age": 3, "kind": "c"}',
    b'{"name": "x", "age": 3, "kind": 2}',
    b'{"name": "x", "age": 3, "home": {}}',
    b'{"name": "x", "age": 3, "score": true}',
    b'["name"]',
])
def test_violations_never_complete(text):
    state = run(text)
    assert state is None or state[0] != "done"


def test_enum_values_that_prefix_each_other_both_work():
    assert run(b'{"name": "", "age": 0, "kind": 1}')[0] == "done"
    assert run(b'{"name": "", "age": 0, "kind": 12}')[0] == "done"


def test_a_number_at_the_top_ends_with_whitespace():
    for schema, text in (({"type": "integer"}, b"42 "), ({"enum": [1, 10]}, b"1\n"), ({}, b"-2.5e3 ")):
        assert run(text[:-1], schema)[0] != "done"
        assert run(text, schema)[0] == "done"


def test_bad_schemas_are_invalid_parameters():
    for bad in ({"type": "thing"}, {"enum": []}, {"type": "array", "minItems": 3, "maxItems": 1},
                {"type": "object", "properties": {"a": {}}, "required": ["b"]}, "object",
                {"enum": [float("nan")]}, {"type": "object", "properties": {"\ud800": {}}}):
        with pytest.raises(InvalidParameterError, match="format"):
            compile_schema(bad)


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


def test_token_walks_under_the_masks_write_only_valid_instances(llama):
    table = token_table(llama.tokenizer, llama.vocab_size)
    rng = random.Random(1)
    finished = 0
    for _ in range(40):
        constraint = JsonConstraint(table, GRAMMAR, start_state(compile_schema(PERSON)))
        text = b""
        for _ in range(200):
            mask = constraint.allowed()
            brute = np.array([p is not None and run(p, PERSON) is not None for p in table.pieces]) \
                if constraint.state[0] == "value" and not constraint.state[1] else None
            if brute is not None:
                np.testing.assert_array_equal(mask, brute)
            choices = np.flatnonzero(mask)
            # Prefer short tokens and closers, so that walks end.
            short = [t for t in choices if len(table.pieces[t]) == 1 and table.pieces[t] not in b" \t\n\r"]
            token = int(rng.choice(short if short and rng.random() < 0.8 else list(choices)))
            constraint.advance(token)
            text += table.pieces[token]
            if constraint.complete:
                break
        if constraint.complete:
            finished += 1
            assert valid(json.loads(text.decode("utf-8", "replace"))), text
    assert finished >= 5


def test_generate_with_a_schema(llama):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    done = mrs.generate(llama, "answer", max_tokens=30, temperature=1.0, top_k=0, top_p=1.0, seed=2, format=schema)
    state = run(done.text.encode("utf-8"), schema)
    assert state is not None
    if done.finish_reason == "stop":
        assert json.loads(done.text) in ({"ok": True}, {"ok": False})
