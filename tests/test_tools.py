"""Tool calls as each family's templates teach them, parsed from the text a model writes;
the tools list, tool_choice and the schema a required call follows."""

from __future__ import annotations

import pytest

from mrs.errors import InvalidParameterError
from mrs.tools import call_schema, check_choice, check_tools, parse_calls, takes_tools, template_format

WEATHER = {"location": "Paris", "unit": "celsius"}

# (format, what the model wrote, content, [(name, arguments)])
WRITTEN = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n'
               "</tool_call>", "", [("get_weather", WEATHER)]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me look.", [("get_weather", WEATHER), ("get_time", {})]),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', "",   # unclosed, string args
     [("get_time", {"zone": "UTC"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"location": "Paris", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": '
               '{"location": "Paris", "unit": "celsius"}}', "", [("get_time", {}), ("get_weather", WEATHER)]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}, '
                '"id": "abcDEF123"}]', "", [("get_weather", WEATHER)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{}',
     "", [("get_weather", WEATHER), ("get_time", {})]),
    ("granite", '<|tool_call|>[{"arguments": {"location": "Paris", "unit": "celsius"}, "name": "get_weather"}]', "",
     [("get_weather", WEATHER)]),
    ("phi4", 'functools[{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}, '
             '{"name": "get_time", "arguments": {}}]', "", [("get_weather", WEATHER), ("get_time", {})]),
]


@pytest.mark.parametrize("fmt, text, content, calls", WRITTEN, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRITTEN)])
def test_a_call_in_each_format_parses_to_its_name_and_arguments(fmt, text, content, calls):
    got_content, got = parse_calls(text, fmt)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", "The weather in Paris is sunny."),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"location": "Par'),     # cut off mid-call
    ("llama3", 'I would call {"name": "get_weather"} but will not.'),
    ("llama3", '{"name": "get_weather", "parameters": {}} and then some words'),
    ("mistral", "[TOOL_CALLS]not a call at all"),
    ("granite", '<|tool_call|>[{"arguments": {}}]'),                                       # no name
    ("phi4", 'functools[{"name": "f", "arguments": [1, 2]}]'),                            # arguments not an object
])
def test_text_that_is_not_a_whole_call_stays_content(fmt, text):
    assert parse_calls(text, fmt) == (text, [])


def test_unknown_formats_are_refused():
    with pytest.raises(ValueError, match="unknown tool call format"):
        parse_calls("{}", "nope")


@pytest.mark.parametrize("template, fmt", [
    ("{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>", "hermes"),
    ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", "mistral"),
    ("{%- if tools %}<|python_tag|>{{ tools }}{% endif %}", "llama3"),
    ('{% if tools %}Respond as {"name": function name, "parameters": dictionary}{% endif %}', "llama3"),
    ("{% if tools %}<|tool_call|>{{ tools }}{% endif %}", "granite"),
    ("{% if message.tools %}<|tool|>{{ message.tools }}<|/tool|>{% endif %}", "phi4"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
])
def test_a_templates_format_comes_from_what_it_teaches(template, fmt):
    assert template_format(template) == fmt
    assert takes_tools(template) == (fmt is not None)


def tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def test_the_tools_list_is_checked_and_normalised():
    tools = check_tools([tool("get_weather"), {"function": {"name": "get_time"}}])
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert tools[1] == {"type": "function", "function": {"name": "get_time",
                                                         "parameters": {"type": "object", "properties": {}}}}
    for bad in ("x", [{"type": "retrieval"}], [{"function": {"name": "has space"}}], [tool("a"), tool("a")],
                [{"function": {"name": "f", "parameters": "{}"}}]):
        with pytest.raises(InvalidParameterError):
            check_tools(bad)


def test_tool_choice_names_one_of_the_tools():
    tools = check_tools([tool("get_weather"), tool("get_time")])
    assert check_choice(None, tools) == "auto" and check_choice(None, []) == "none"
    assert check_choice("required", tools) == "required"
    assert check_choice({"type": "function", "function": {"name": "get_time"}}, tools) == "get_time"
    for bad in ({"type": "function", "function": {"name": "other"}}, "sometimes", 3):
        with pytest.raises(InvalidParameterError):
            check_choice(bad, tools)
    with pytest.raises(InvalidParameterError):
        check_choice("required", [])


def test_a_required_call_follows_the_named_functions_parameters():
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = check_tools([tool("get_weather", parameters), tool("get_time")])
    assert call_schema(tools, "get_weather") == {
        "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": parameters},
        "required": ["name", "arguments"]}
    several = call_schema(tools, "required")
    assert several["properties"]["name"] == {"enum": ["get_weather", "get_time"]}
    assert call_schema(tools[:1], "required")["properties"]["arguments"] == parameters
