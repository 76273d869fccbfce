"""JSON-schema-constrained decoding: instances of a schema are accepted, violations are
not, and token walks under the masks only ever write schema-valid JSON."""

from __future__ import annotations

import json
import random
import re

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


def run(text: bytes, schema=PERSON, state=None):
    state = start_state(compile_schema(schema)) if state is None else state
    for byte in text:
        state = schema_feed(state, byte)
        if state is None:
            return None
    return state


def valid(value, schema=PERSON) -> bool:
    """A small reference validator for the keywords these tests use."""
    def same(a, b):  # JSON equality: True is not 1, 1 is 1.0
        if isinstance(a, bool) or isinstance(b, bool):
            return type(a) is type(b) and a == b
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return (type(a) is type(b) or {type(a), type(b)} <= {int, float}) and a == b

    if "const" in schema:
        return same(value, schema["const"])
    if "enum" in schema:
        return any(same(value, e) for e in schema["enum"])
    if "anyOf" in schema:
        return any(valid(value, branch) for branch in schema["anyOf"])
    if "oneOf" in schema:
        return sum(valid(value, branch) for branch in schema["oneOf"]) == 1
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
    if isinstance(value, list):
        return (schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
                and all(valid(v, schema.get("items", {})) for v in value))
    return True


scalars = st.none() | st.booleans() | st.integers(-999, 999) | st.text(max_size=6)
person = st.fixed_dictionaries(
    {"name": st.text(max_size=10), "age": st.integers(-10**9, 10**9)},
    optional={"tags": st.lists(st.text(max_size=5), max_size=3), "kind": st.sampled_from(["a", "b", 1, 12, None]),
              # (below 10^308: mrs.schema keeps numbers finite doubles with room to spare)
              "score": st.none() | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e307,
                                             max_value=1e307) | st.integers(),
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
                {"type": "array", "minItems": -1}, {"type": "array", "minItems": "2"},
                {"type": "object", "properties": {"a": {}}, "required": ["b"]}, "object",
                {"enum": [float("nan")]}, {"type": "object", "properties": {"\ud800": {}}}):
        with pytest.raises(InvalidParameterError, match="format"):
            compile_schema(bad)


def test_min_items_refuses_to_close_a_short_array():
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
    assert run(b"[]", schema) is None and run(b"[1]", schema) is None and run(b"[1, 2,", schema) is not None
    assert run(b"[1, 2]", schema)[0] == "done" and run(b"[1, 2, 3]", schema)[0] == "done"
    assert run(b"[1, 2, 3,", schema) is None


def test_const_accepts_only_its_value():
    schema = {"type": "object", "properties": {"c": {"const": {"a": [1, "x"]}}}, "required": ["c"]}
    assert run(b'{"c": {"a": [1, "x"]}}', schema)[0] == "done"
    for other in (b'{"c": {"a": [1, "y"]}}', b'{"c": {"a": [1]}}', b'{"c": {}}', b'{"c": 1}', b'{"c": null}'):
        assert run(other, schema) is None, other


@pytest.mark.parametrize("union", ["anyOf", "oneOf"])
def test_any_of_and_one_of_of_plain_types_accept_only_those_types(union):
    schema = {"type": "object", "properties": {"v": {union: [{"type": "integer"}, {"type": "null"}]}},
              "required": ["v"]}
    for good in (b'{"v": 3}', b'{"v": -12}', b'{"v": null}'):
        assert run(good, schema)[0] == "done", good
    for bad in (b'{"v": 3.5}', b'{"v": 1e3}', b'{"v": "3"}', b'{"v": true}', b'{"v": []}', b'{"v": {}}'):
        state = run(bad, schema)
        assert state is None or state[0] != "done", bad


def test_max_length_counts_characters_an_escape_or_a_multibyte_one_as_one():
    short = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"]}
    for good in ('{"city": "abc"}', '{"city": ""}', '{"city": "a\\nb"}', '{"city": "\\u00e9t\u00e9"}',
                 '{"city": "日本語"}'):
        assert run(good.encode(), short)[0] == "done", good
    for bad in ('{"city": "abcd"}', '{"city": "日本語x"}', '{"city": "\\n\\n\\n\\n"}'):
        assert run(bad.encode(), short) is None, bad
    assert run(b'"x"', {"type": "string", "maxLength": 0}) is None and run(b'""', {"type": "string", "maxLength": 0})
    with pytest.raises(InvalidParameterError, match="maxLength"):
        compile_schema({"type": "string", "maxLength": -1})


def test_keywords_mrs_does_not_enforce_leave_the_value_free():
    """As documented in mrs.schema: no error, the value is only held to its type (or to
    nothing, for a union with a number among structured branches)."""
    assert run(b'"b"', {"type": "string", "pattern": "^a$"})[0] == "done"
    assert run(b'{"n": 99}', {"type": "object", "properties": {"n": {"type": "integer", "maximum": 1}},
                              "required": ["n"]})[0] == "done"
    union = {"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "integer"}]}
    assert run(b'"anything"', union)[0] == "done" and run(b'[1, {"b": 2}]', union)[0] == "done"


CALLS = {"anyOf": [
    {"type": "object", "properties": {"name": {"const": "get_time"}, "arguments": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}},
     "required": ["name", "arguments"]},
    {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}, "required": ["name", "arguments"]},
    {"type": "null"},
]}


@pytest.mark.parametrize("text, ok", [
    (b'{"name": "get_time", "arguments": {"zone": "CET"}}', True),
    (b'{"arguments": {"a": 1, "b": 2}, "name": "add"}', True),          # arguments first: both run until the name
    (b'{"name": "add", "arguments": {"a": 1, "b": -4}}', True),
    (b"null", True),
    (b'{"name": "get_time", "arguments": {"a": 1, "b": 2}}', False),    # the other branch's arguments
    (b'{"name": "add", "arguments": {"zone": "UTC"}}', False),
    (b'{"arguments": {"zone": "UTC"}, "name": "add"}', False),           # ruled out at the name
    (b'{"name": "add", "arguments": {"a": 1}}', False),                  # a required argument missing
    (b'{"name": "other", "arguments": {}}', False),
    (b'"text"', False),
])
def test_a_union_of_objects_holds_each_value_to_one_branch(text, ok):
    state = run(text, CALLS)
    assert (state is not None and state[0] == "done") == ok, text


def test_every_number_written_is_a_finite_double():
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    for good in (b'{"x": 1e99}', b'{"x": 9.9e+307}', b'{"x": -123456789012345678901234}', b'{"x": 0.5e-3}',
                 b'{"x": 4.5E-12}', b'{"x": 0.25}', b'{"x": 1e-999}', b'{"x": 12e+306}', b'{"x": -0}'):
        state = run(good, schema)
        assert state[0] == "done" and json.loads(good)["x"] not in (float("inf"), float("-inf")), good
    for bad in (b'{"x": 1e999', b'{"x": 4.624E111111914', b'{"x": 1' + b"0" * 40, b'{"x": 123e+307',
                b'{"x": 1e-1000', b'{"x": 1e308', b'{"x": ' + b"1" * 39 + b"."):    # (no room for a digit)
        assert run(bad, schema) is None, bad
    assert run(b'{"x": ' + b"1" * 38 + b".5}", schema)[0] == "done"


def test_declared_empty_properties_allow_only_the_empty_object():
    empty = {"type": "object", "properties": {}}
    assert run(b"{}", empty)[0] == "done" and run(b"{ }", empty)[0] == "done"
    assert run(b'{"a": 1}', empty) is None
    assert run(b'{"a": 1}', {"type": "object"})[0] == "done"        # no properties: any keys


def test_a_union_inside_an_object_ends_where_its_branch_ends():
    schema = {"type": "object", "properties": {"call": CALLS, "n": {"type": "integer"}}, "required": ["call", "n"]}
    assert run(b'{"call": {"name": "add", "arguments": {"a": 1, "b": 2}}, "n": 3}', schema)[0] == "done"
    assert run(b'{"call": null, "n": 3}', schema)[0] == "done"
    assert run(b'{"call": {"name": "add", "arguments": {"a": 1, "b": 2}}}', schema) is None   # n is required


def test_whitespace_before_the_value_is_capped_so_an_answer_cannot_be_blank():
    answer = b'{"name": "x", "age": 3}'
    assert run(b"\r\n" + answer)[0] == "done" and run(b" " + answer)[0] == "done"
    assert run(b"   " + answer) is None


@pytest.mark.parametrize("before,after", [(b"{", b'"'), (b'{"name"', b":"), (b'{"name":', b'"'),
                                          (b'{"name": "x"', b","), (b'{"name": "x",', b'"'),
                                          (b'{"name": "x", "age": 3', b"}"), (b'{"tags": [', b'"'),
                                          (b'{"tags": ["a"', b"]"), (b'{"tags": ["a",', b'"')])
def test_whitespace_in_every_gap_is_capped_so_a_model_cannot_stall(before, after):
    indent = b"\n" + b" " * 64      # 65 bytes: a newline and 16 levels of 4-space indentation
    assert run(before + indent + after) is not None
    assert run(before + indent + b" ") is None


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
            brute = np.array([p is not None and run(p, state=constraint.state) is not None
                              for p in table.pieces])
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


def whitespace_runs(text: bytes) -> list[int]:
    """The lengths of the whitespace runs between JSON tokens (strings, even an unfinished
    one, blanked out first)."""
    outside = re.sub(rb'"(\\.|[^"\\])*"?', b'""', text, flags=re.S)
    return [len(run) for run in re.findall(rb"[ \t\n\r]+", outside)]


OK = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
PAIR = {"type": "array", "items": {"enum": [0, 1]}, "minItems": 2, "maxItems": 2}
CONST = {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]}
UNION = {"type": "object", "required": ["v", "w"],
         "properties": {"v": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                        "w": {"oneOf": [{"type": "integer"}, {"type": "null"}]}}}
SEEDS = range(4)


def answer(model, schema, seed):
    """The random model's answer under a schema. It pads every gap with whitespace up to
    the cap (about 20 tokens a gap), so these short schemas need some 50-140 tokens."""
    return mrs.generate(model, "answer", max_tokens=200, temperature=2.0, top_k=0, top_p=1.0, seed=seed,
                        format=schema)


@pytest.fixture(scope="module")
def answers(llama):
    schemas = {"ok": OK, "pair": PAIR, "const": CONST, "union": UNION}
    return {(name, seed): answer(llama, schema, seed) for name, schema in schemas.items() for seed in SEEDS}


@pytest.mark.parametrize("name,schema", [("ok", OK), ("pair", PAIR), ("const", CONST), ("union", UNION)])
def test_generation_under_a_schema_stops_at_a_closed_valid_instance(answers, name, schema):
    for seed in SEEDS:
        done = answers[name, seed]
        assert done.finish_reason == "stop" and done.completion_tokens < 200, (seed, done.text)
        assert valid(json.loads(done.text), schema), (seed, done.text)
        assert run(done.text.encode("utf-8"), schema)[0] == "done" and done.text.endswith(("}", "]"))
        text = done.text.encode("utf-8")
        lead = len(text) - len(text.lstrip())
        # mrs/json_grammar.py's caps: 2 bytes before the value, 65 in any other gap.
        assert lead <= 2 and max(whitespace_runs(text[lead:]), default=0) <= 65, (seed, done.text)


def test_const_and_min_items_bite_during_generation(llama, answers):
    assert all(json.loads(answers["const", seed].text) == {"answer": "yes"} for seed in SEEDS)
    # Without minItems, seed 1 closes the array after one item; with it, the same draws go on to two.
    free = answer(llama, {k: v for k, v in PAIR.items() if k != "minItems"}, 1)
    assert free.finish_reason == "stop" and len(json.loads(free.text)) == 1
    assert all(len(json.loads(answers["pair", seed].text)) == 2 for seed in SEEDS)


def test_any_of_and_one_of_bite_during_generation(llama, answers):
    for seed in SEEDS:
        value = json.loads(answers["union", seed].text)
        assert value["v"] in (True, False, None) and isinstance(value["v"], (bool, type(None)))
        assert value["w"] is None or type(value["w"]) is int
    # Left free, seed 2 writes a number for "v".
    free = answer(llama, {**UNION, "properties": {"v": {}, "w": {}}}, 2)
    assert free.finish_reason == "stop" and not isinstance(json.loads(free.text)["v"], (bool, type(None)))
