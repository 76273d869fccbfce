"""JSON-constrained decoding: the byte automaton against Python's json module, the
vocabulary masks against the automaton, and generation end to end."""

from __future__ import annotations

import json
import random
import re

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


# The caps, written out rather than imported, so that a test fails if the product's caps drift.
# Before the object: a newline, CR LF or a SentencePiece word-start space, no more.
LEADING_WHITESPACE = 2
# Any other gap: a newline and 16 levels of 4-space indentation.
GAP_WHITESPACE = 65
# Every kind of gap inside an object, as (text before the gap, a byte that may follow it).
GAPS = [(b"{", b'"'), (b'{"a"', b":"), (b'{"a":', b"1"), (b'{"a": 1', b","), (b'{"a": 1,', b'"'),
        (b'{"a": [', b"1"), (b'{"a": [1', b"]"), (b'{"a": [1,', b"2"), (b'{"a": "x"', b"}"),
        (b'{"a": 1', b"}")]


def test_whitespace_before_the_object_is_capped_so_an_answer_cannot_be_blank():
    assert run(b" \n{}")[0] == "done" and run(b"\r\n{}")[0] == "done"
    assert run(b"  \n") is None and run(b"\n\n\n{}") is None


@pytest.mark.parametrize("before,after", GAPS)
def test_whitespace_in_every_gap_of_the_object_is_capped_so_a_model_cannot_stall(before, after):
    indent = b"\n" + b" " * (GAP_WHITESPACE - 1)
    assert run(before + indent + after) is not None
    assert run(before + indent + b" ") is None and run(before + indent + b"\t") is None


def test_whitespace_is_capped_gap_by_gap_not_over_the_whole_object():
    indent = b"\n" + b" " * (GAP_WHITESPACE - 1)
    assert run(indent.join([b"{", b'"a"', b":", b"[", b"1", b",", b"2", b"]", b"}"]))[0] == "done"


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


def whitespace_runs(text: bytes) -> list[int]:
    """The lengths of the whitespace runs between JSON tokens (strings, even an unfinished
    one, blanked out first)."""
    outside = re.sub(rb'"(\\.|[^"\\])*"?', b'""', text, flags=re.S)
    return [len(run) for run in re.findall(rb"[ \t\n\r]+", outside)]


JSON_SEEDS = range(6)


@pytest.fixture(scope="module")
def json_answers(llama):
    """Answers under format="json", one per seed. The random model mostly opens a string
    that never closes (finish "length"); seed 2 closes its object within the budget."""
    return {seed: mrs.generate(llama, "json please", max_tokens=40, temperature=1.0, top_k=0, top_p=1.0,
                               seed=seed, format="json") for seed in JSON_SEEDS}


def test_generation_with_format_json_only_writes_json_prefixes(json_answers):
    for done in json_answers.values():
        state = run(done.text.encode("utf-8"))
        assert state is not None, done.text
        if done.finish_reason == "length":
            assert done.completion_tokens == 40 and state[0] != "done"
            assert isinstance(loads(done.text.encode() + closing(state)), dict)


def test_generation_stops_at_the_token_that_closes_the_object(json_answers):
    closed = [done for done in json_answers.values() if done.finish_reason == "stop"]
    assert closed, [done.text for done in json_answers.values()]
    for done in closed:
        assert isinstance(json.loads(done.text), dict) and done.text.endswith("}")
        assert done.completion_tokens < 40 and len(done.token_ids) == done.completion_tokens
        assert run(done.text.encode())[0] == "done"


def test_generated_whitespace_keeps_to_the_caps(json_answers):
    for done in json_answers.values():
        text = done.text.encode("utf-8")
        lead = len(text) - len(text.lstrip(b" \t\n\r"))
        assert lead <= LEADING_WHITESPACE and text[lead:lead + 1] == b"{", done.text
        assert max(whitespace_runs(text[lead:]), default=0) <= GAP_WHITESPACE, done.text


def test_a_row_output_finishes_on_the_closing_token_of_a_non_empty_object(llama, table):
    from mrs.constrain import constraint_for
    from mrs.engine.generate import RowOutput

    row = RowOutput(llama, prompt_len=3, max_tokens=20, stops=(), ignore_eos=False,
                    constraint=constraint_for(llama, "json"))
    pieces = (b"{", b'"', b"a", b'"', b":", b" ", b"[", b"1", b",", b"2", b"]", b"}")
    for i, piece in enumerate(pieces):
        token = next(t for t, p in enumerate(table.pieces) if p == piece)
        row.add(token, 0.0)
        assert row.finish == ("stop" if i == len(pieces) - 1 else None), piece
    assert json.loads(row.text) == {"a": [1, 2]}


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
