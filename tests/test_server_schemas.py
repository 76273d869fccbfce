"""Request parsing: bodies, option mapping per dialect, keep_alive durations."""

from __future__ import annotations

import pytest

from mrs.errors import InvalidParameterError, MrsError
from mrs.server.schemas import (
    ollama_messages,
    ollama_options,
    openai_messages,
    openai_options,
    parse_body,
    parse_duration,
)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"x"', b"\xff{}", b'{"a": NaN}', b"[" * 100_000])
def test_only_a_utf8_json_object_is_a_body(body):
    with pytest.raises(MrsError) as e:
        parse_body(body)
    assert e.value.http_status == 400


@pytest.mark.parametrize("value,seconds", [(300, 300.0), (0, 0.0), (-1, -1.0), ("5m", 300.0), ("1h30m", 5400.0),
                                           ("-1", -1.0), ("0", 0.0), ("1.5s", 1.5), ("250ms", 0.25), ("-5m", -300.0),
                                           ("10", 10.0)])
def test_keep_alive_accepts_seconds_and_go_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "", True, None, [], "1x"])
def test_keep_alive_rejects_anything_else(value):
    with pytest.raises(InvalidParameterError):
        parse_duration(value)


def test_ollama_options_map_onto_sampling_and_ignore_unknown_keys():
    opts = ollama_options({"options": {"num_predict": 7, "temperature": 0.2, "top_k": 5, "top_p": 0.5,
                                       "min_p": 0.1, "seed": 3, "stop": ["\n"], "repeat_penalty": 1.2,
                                       "repeat_last_n": -1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                                       "num_ctx": 128, "mirostat": 2, "num_gpu": 1, "whatever": "x"}})
    assert opts.max_tokens == 7 and opts.stop == ("\n",) and opts.context == 128
    assert opts.sampling == {"temperature": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 3,
                             "repeat_penalty": 1.2, "repeat_last_n": -1, "presence_penalty": 0.5,
                             "frequency_penalty": 0.25}
    assert ollama_options({"options": {"num_predict": -1}}).max_tokens is None
    assert ollama_options({"options": {"top_k": 40.0}}).sampling["top_k"] == 40


@pytest.mark.parametrize("options", [{"temperature": "0.5"}, {"top_k": 2.5}, {"top_k": True}, {"seed": 1.5},
                                     {"stop": [1]}, {"num_predict": -3}, {"top_p": 0}, {"temperature": -0.1},
                                     {"num_ctx": 0}, {"repeat_last_n": -2}])
def test_ollama_options_with_a_wrong_type_or_range_are_rejected(options):
    with pytest.raises(InvalidParameterError):
        ollama_options({"options": options})


def test_openai_options_use_openai_defaults_and_both_max_token_fields():
    chat = openai_options({}, chat=True)
    assert chat.max_tokens is None and chat.sampling["temperature"] == 1.0 and chat.sampling["top_p"] == 1.0
    assert openai_options({"max_completion_tokens": 5, "max_tokens": 9}, chat=True).max_tokens == 5
    assert openai_options({}, chat=False).max_tokens == 16
    legacy = openai_options({"logprobs": 3}, chat=False)
    assert legacy.logprobs and legacy.top_logprobs == 3
    assert openai_options({"n": 4, "stop": "x"}, chat=True).n == 4


@pytest.mark.parametrize("body", [{"n": 0}, {"n": 17}, {"temperature": 2.5}, {"top_logprobs": 3},
                                  {"logit_bias": {"1": 5}}, {"max_tokens": 0}, {"presence_penalty": 3}])
def test_openai_options_reject_what_openai_rejects(body):
    with pytest.raises(MrsError):
        openai_options(body, chat=True)


def test_messages_are_normalised_per_dialect():
    assert openai_messages({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]},
                                         {"role": "user", "content": None}]}) == [
        {"role": "system", "content": "ab"}, {"role": "user", "content": ""}]
    assert ollama_messages({"messages": []}) == []
    with pytest.raises(MrsError):
        openai_messages({"messages": []})
    with pytest.raises(MrsError):
        ollama_messages({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]})
