"""JSON-constrained decoding: the byte automaton against Python's json module, the
vocabulary masks against the automaton, and generation end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mrs
from mrs.constrain import START, JsonConstraint, TokenTable, feed, token_bytes, token_table
from mrs.errors import InvalidParameterError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads(text: bytes):
    """Python's json as the oracle: bytes that are not UTF-8 decode as U+FFFD, as mrs's
    detokenizer shows them; NaN and Infinity (Python extensions) are refused."""
    return json.loads(text.decode("utf-8", "replace"), parse_constant=reject_constant)


def run(text: bytes, state=START):
    for byte in text:
        state = feed(state, byte)
        if state is None:
            return None
    return state


def closing(state) -> bytes:
    """Bytes that finish the JSON value from ``state`` — an oracle independent of the masks."""
    mode, stack, extra = state
    tail = {"minus": b"0", "dot": b"0", "e": b"0", "esign": b"0", "value": b"0", "colon": b":0", "key": b'"k":0',
            "top": b"{"}.get(mode, b"")
    if mode in ("str", "esc", "hex"):
        is_key = extra if mode != "hex" else extra[0]
        tail = {"esc": b"n", "hex": b"0" * (extra[1] if mode == "hex" else 0)}.get(mode, b"") + b'"'
        tail += b":0" if is_key else b""
    if mode == "lit":
        tail = extra
    closers = b"".join(b"}" if c == "o" else b"]" for c in reversed(stack + ("o" if mode == "top" else "")))
    return tail + closers


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.sampled_from([None, 0, 2]),
       st.booleans())
def test_every_json_object_is_accepted_to_completion(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode("utf-8")
    state = run(text)
    assert state is not None and state[0] == "done", text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30) | st.text(alphabet='{}[]":,0123456789.eE+-truefalsn \\', max_size=30).map(str.encode))
def test_what_the_automaton_finishes_is_a_json_object(text):
    state = run(text)
    try:
        parsed = loads(text)
    except ValueError:
        parsed = None
    if state is not None and state[0] == "done":
        assert isinstance(parsed, dict), text
    elif isinstance(parsed, dict) and text == text.strip():
        pytest.fail(f"valid object {text!r} not accepted")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_every_accepted_prefix_can_still_become_json(text):
    state = run(text)
    if state is not None and state[0] != "done":
        assert isinstance(loads(text + closing(state)), dict), (text, state)


def test_whitespace_runs_are_capped_so_a_model_cannot_stall():
    assert run(b"{" + b"\n" + b" " * 64) is not None
    assert run(b"{" + b"\n" + b" " * 65) is None


def test_nothing_follows_the_closed_object():
    assert run(b'{"a": [1, 2.5e-3, true, null, "x\\u00e9"]}')[0] == "done"
    assert run(b'{"a": 1} ') is None and run(b"[1]") is None and run(b'{"a": 01}') is None


@pytest.fixture(scope="module")
def llama(fixture_path):
    return mrs.load(str(fixture_path("llama")))


@pytest.fixture(scope="module")
def table(llama):
    return token_table(llama.tokenizer, llama.vocab_size)


def test_token_bytes_round_trip_through_the_tokenizer(llama):
    pieces = token_bytes(llama.tokenizer, llama.vocab_size)
    for index, piece in enumerate(pieces):
        if piece is not None and index < 450:
            text = llama.tokenizer.decode([index], skip_special_tokens=False)
            if "\ufffd" not in text:
                assert text.encode("utf-8") == piece
    assert pieces[450:] == [None] * (llama.vocab_size - 450)      # ids past the tokenizer have no text
    assert all(pieces[t] is None for t in llama.eos_ids)


def test_masks_equal_feeding_each_token_to_the_automaton(table):
    rng = random.Random(0)
    state, text = START, b""
    for _ in range(300):
        mask = table.allowed(state)
        brute = np.array([p is not None and run(p, state) is not None for p in table.pieces])
        np.testing.assert_array_equal(mask, brute)
        choices = np.flatnonzero(mask)
        # Lean towards closing so walks end; any allowed token must keep the text completable.
        closers = [t for t in choices if run(table.pieces[t], state)[0] in ("after", "done")]
        token = int(rng.choice(closers if closers and rng.random() < 0.3 else list(choices)))
        state, text = run(table.pieces[token], state), text + table.pieces[token]
        if state[0] == "done":
            assert isinstance(loads(text), dict)
            state, text = START, b""
        else:
            assert isinstance(loads(text + closing(state)), dict)


def test_generation_with_format_json_only_writes_json(llama):
    for seed in range(3):
        done = mrs.generate(llama, "json please", max_tokens=40, temperature=1.0, top_k=0, top_p=1.0,
                            seed=seed, format="json")
        state = run(done.text.encode("utf-8"))
        assert state is not None
        if done.finish_reason == "stop":
            assert isinstance(json.loads(done.text), dict)
        else:
            assert done.finish_reason == "length" and done.completion_tokens == 40
            assert isinstance(loads(done.text.encode() + closing(state)), dict)


def test_a_row_finishes_when_its_object_closes(llama, table):
    constraint = JsonConstraint(table)
    for piece in (b"{", b'"', b"a", b'"', b":", b"1", b"}"):
        token = next(i for i, p in enumerate(table.pieces) if p == piece)
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.complete


def test_unknown_format_is_an_invalid_parameter(llama):
    with pytest.raises(InvalidParameterError, match="format"):
        mrs.generate(llama, "hi", max_tokens=2, format="yaml")


def test_a_table_needs_bytes_to_build_json():
    table = TokenTable([b"a", b"b", None])
    assert not table.allowed(START).any()
