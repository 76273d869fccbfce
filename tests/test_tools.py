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
        "required": ["name", "arguments"], "x-mrs-whitespace": 1}
    several = call_schema(tools, "required")
    assert [(b["properties"]["name"], b["properties"]["arguments"]) for b in several["anyOf"]] == [
        ({"const": "get_weather"}, parameters), ({"const": "get_time"}, {"type": "object", "properties": {}})]
    assert call_schema(tools[:1], "required")["properties"]["arguments"] == parameters


def test_tools_and_tool_messages_reach_the_template_as_transformers_renders_them(fixture_path, tmp_path):
    """The tools list and a tool round trip (an assistant's call, the tool's result) render as
    transformers' apply_chat_template(..., tools=...) renders them, from mrs's message checks."""
    transformers = pytest.importorskip("transformers")
    from tool_template import with_tools_template

    from mrs.server.schemas import openai_messages
    from mrs.tokenizer import Tokenizer

    folder = with_tools_template(fixture_path("llama"), tmp_path / "llama-tools")
    tools = check_tools([tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})])
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    messages = openai_messages({"messages": sent})
    ours = Tokenizer(folder).apply_chat_template(messages, tools=tools)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert '"name": "get_weather"' in ours and '{"city": "Paris"}' in ours and "18 C and sunny" in ours


class FakeTokenizer:
    """Token i is ``pieces[i]``; those in ``special`` vanish from the visible text."""

    def __init__(self, pieces: list[str], special: frozenset[str] = frozenset()):
        self.pieces, self.special = pieces, special

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] in self.special))


def streamed(use, pieces: list[str], special: frozenset[str] = frozenset()) -> tuple[str, list, str]:
    """(content a stream of ``pieces`` sends, the calls at its end, the content a whole
    answer gives): one token per piece, special ones invisible in the streamed text."""
    from types import SimpleNamespace

    tokenizer = FakeTokenizer(pieces, special)
    held, sent = use.stream(tokenizer), ""
    for i, piece in enumerate(pieces):
        sent += held.push(tokenizer.decode([i]), [i])
    ids = list(range(len(pieces)))
    done = SimpleNamespace(text=tokenizer.decode(ids), token_ids=ids, finish_reason="stop")
    content, calls = use.result(SimpleNamespace(tokenizer=tokenizer), done)
    return sent + held.finish(content, calls), calls, content


@pytest.mark.parametrize("fmt, pieces, content, names", [
    ("hermes", ["Let me ", "check. <tool", '_call>{"name": "get_time", ', '"arguments": {}}</tool_call>'],
     "Let me check. ", ["get_time"]),
    ("hermes", ["Use <b>", "bold</b> <tool", "s> please"], "Use <b>bold</b> <tools> please", []),
    ("llama3", [' {"name": "get_time",', ' "parameters": {}}'], "", ["get_time"]),
    ("llama3", ["Hello", " there"], "Hello there", []),
    ("llama3", ['{"not": "a call"}'], '{"not": "a call"}', []),
    ("phi4", ["func", 'tools[{"name": "get_time", "arguments": {}}]'], "", ["get_time"]),
    ("mistral", ['[{"name": "get_time", "arguments": {}}]'], '[{"name": "get_time", "arguments": {}}]', []),
])
def test_a_stream_holds_back_what_may_open_a_call_and_sends_the_rest(fmt, pieces, content, names):
    from mrs.server.tool_calls import ToolUse

    use = ToolUse(check_tools([tool("get_time")]), "auto", format=fmt)
    sent, calls, whole = streamed(use, pieces)
    assert sent == content and [c.name for c in calls] == names
    assert sent.strip() == whole.strip()   # the whole answer's content, but for the whitespace already sent


@pytest.mark.parametrize("fmt, pieces, special, content", [
    # Mistral's newer form and Phi-4-mini's with special markers: the visible text alone
    # would look like words, and the call would go out twice (as content and as a call).
    ("mistral", ["[TOOL_CALLS]", "get_time", "[ARGS]", "{}"], {"[TOOL_CALLS]", "[ARGS]"}, ""),
    ("phi4", ["<|tool_call|>", '[{"name": "get_time", "arguments": {}}]', "<|/tool_call|>"],
     {"<|tool_call|>", "<|/tool_call|>"}, ""),
    ("hermes", ["Sure. ", "<tool_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>"],
     {"<tool_call>", "</tool_call>"}, "Sure. "),
    # Text after a call is sent at the end, as a whole answer has it.
    ("hermes", ["Let me check. ", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
                " Meanwhile, more."], set(), "Let me check.  Meanwhile, more."),
    ("hermes", ["\n", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "\nDone."], set(), "\nDone."),
])
def test_a_call_behind_special_tokens_is_held_back_and_sent_once(fmt, pieces, special, content):
    from mrs.server.tool_calls import ToolUse

    use = ToolUse(check_tools([tool("get_time")]), "auto", format=fmt)
    sent, calls, whole = streamed(use, pieces, frozenset(special))
    assert [c.name for c in calls] == ["get_time"]
    assert sent == content and sent.strip() == whole.strip()


def test_a_call_to_a_tool_not_offered_stays_text_and_parallel_calls_can_be_cut_to_one():
    from mrs.server.tool_calls import ToolUse

    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    sent, calls, _ = streamed(ToolUse(check_tools([tool("get_time")]), "auto", format="hermes"), [text])
    assert calls == [] and sent == text
    two = ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'] * 2
    _, calls, _ = streamed(ToolUse(check_tools([tool("get_time")]), "auto", format="hermes"), two)
    assert len(calls) == 2
    _, calls, _ = streamed(ToolUse(check_tools([tool("get_time")]), "auto", parallel=False, format="hermes"), two)
    assert len(calls) == 1


@pytest.mark.parametrize("text", ['<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>',
                                  '<tool_call>{"name": "get_time", "arguments": {"x": 1e999}}</tool_call>',
                                  '<tool_call>{"name": "get_time", "arguments": ' + "[" * 5000 + "]" * 5000
                                  + "}</tool_call>"])
def test_a_call_json_cannot_carry_stays_text(text):
    assert parse_calls(text, "hermes") == (text, [])


def test_a_tool_name_is_the_whole_string():
    with pytest.raises(InvalidParameterError):
        check_tools([{"function": {"name": "get_time\n"}}])
