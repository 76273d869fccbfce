"""`mrs chat`: slash commands, sessions on disk, Ctrl-C, KV reuse between turns, and
markdown that renders while it streams — driven through stdin, in-process, and through a
pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import sys

from cli_process import PYTHON, REPO
from fake_chat import MARKDOWN_ANSWER, FakeModel, FakeSession
from rich.console import Console
from rich.markdown import Markdown
from term_screen import PtySession, Screen

from mrs import cli
from mrs.chat import Chat, Conversation, terminal_reader
from mrs.cli import main
from mrs.errors import MrsError
from mrs.render import MarkdownStream, finished_prefix

pytest_plugins = ["cli_helpers"]  # fixtures: llama_dir, llama_model, home


def make_chat(lines, answer="Hello there.", **kw):
    """A chat over a FakeSession reading ``lines``; returns (chat, session, console output)."""
    out = io.StringIO()
    sessions = []

    def make_session(model):
        sessions.append(FakeSession(model, answer, **kw))
        return sessions[-1]

    feed = iter(lines)
    chat = Chat(FakeModel(), console=Console(file=out, width=100), read=lambda prompt: next(feed, None),
                make_session=make_session, load_model=lambda ref: FakeModel(ref))
    return chat, sessions, out


# -- the REPL, with a fake session ---------------------------------------------------------

def test_messages_and_answers_build_the_conversation_sent_each_turn():
    chat, (session,), out = make_chat(["Hi", "And then?"])
    assert chat.run() == 0
    first, second = session.calls
    assert first[0] == [{"role": "user", "content": "Hi"}]
    assert second[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                         {"role": "user", "content": "And then?"}]
    assert out.getvalue().count("Hello there.") == 2


def test_system_set_and_history_and_clear():
    chat, (session,), out = make_chat(["/system Be terse.", "/system", "Hi", "/history", "/clear", "/history",
                                       "Again"])
    chat.run()
    text = out.getvalue()
    assert "system: Be terse." in text
    assert "system: Be terse.\nuser: Hi\nassistant: Hello there." in text
    assert "conversation cleared" in text and "(no messages yet)" in text
    assert session.resets == 1
    assert session.calls[-1][0] == [{"role": "system", "content": "Be terse."},
                                    {"role": "user", "content": "Again"}]


def test_set_changes_sampling_options_and_rejects_bad_ones():
    chat, (session,), out = make_chat(["/set temperature 0", "/set top_p 0.5", "/set top_k 3", "/set max_tokens 7",
                                       "/set seed 42", "/set seed none", "/set top_p 2", "/set temperature hot",
                                       "/set max_tokens 0", "/set colour red", "/set temperature", "/set", "Hi"])
    chat.run()
    options = session.calls[0][1]
    assert options == {"temperature": 0.0, "top_p": 0.5, "top_k": 3, "max_tokens": 7, "seed": None}
    text = out.getvalue()
    assert "top_p must be a number in (0, 1], got '2'" in text
    assert "temperature must be a number >= 0" in text
    assert "max_tokens must be an integer >= 1" in text
    assert "unknown option 'colour'" in text
    assert "usage: /set KEY VALUE" in text
    assert "temperature=0.0, top_p=0.5, top_k=3, max_tokens=7, seed=None" in text


def test_help_unknown_commands_and_exit():
    chat, (session,), out = make_chat(["/help", "/frobnicate", "/exit", "never read"])
    assert chat.run() == 0
    text = out.getvalue()
    assert "/system [TEXT]" in text and "/save FILE" in text
    assert "unknown command /frobnicate" in text
    assert session.calls == []


def test_save_then_load_restores_messages_system_and_options(tmp_path):
    file = tmp_path / "s.json"
    chat, _, _ = make_chat(["/system Be kind.", "/set temperature 0.3", "Hi", f"/save {file}"])
    chat.run()
    saved = json.loads(file.read_text())
    assert saved["model"] == "acme/fake" and saved["system"] == "Be kind."
    assert saved["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    chat2, (session2,), out2 = make_chat([f"/load {file}", "More"])
    chat2.run()
    messages, options = session2.calls[0]
    assert messages[:3] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello there."}]
    assert options["temperature"] == 0.3
    assert session2.resets == 1  # the cache of the old conversation is dropped
    assert "loaded 2 messages" in out2.getvalue()


def test_load_rejects_files_that_are_not_sessions(tmp_path):
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    (tmp_path / "junk.json").write_text("not json")
    chat, _, out = make_chat([f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'junk.json'}",
                              f"/load {tmp_path / 'none.json'}", "/load"])
    chat.run()
    text = out.getvalue()
    assert "role user/assistant" in text and "cannot read session" in text and "no session file" in text
    assert "usage: /load FILE" in text


def test_ctrl_c_stops_the_answer_not_the_chat():
    chat, (session,), out = make_chat(["Tell me a story", "Go on"], answer="Once upon a time there was")
    session.interrupt_after = 2
    chat.run()
    assert len(session.calls) == 2  # the chat went on to the next message
    assert session.calls[1][0][1] == {"role": "assistant", "content": "Once upon "}  # what was shown is kept
    assert session.resets == 1  # the interrupted turn's cache is not reused
    assert "[answer stopped]" in out.getvalue()


def test_ctrl_c_at_the_prompt_does_not_leave():
    lines = iter([KeyboardInterrupt, "Hi"])

    def read(prompt):
        item = next(lines, None)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    out = io.StringIO()
    session = FakeSession(FakeModel())
    chat = Chat(FakeModel(), console=Console(file=out), read=read, make_session=lambda m: session)
    assert chat.run() == 0
    assert "use /exit or Ctrl-D" in out.getvalue() and len(session.calls) == 1


def test_a_model_error_is_reported_and_the_message_dropped():
    chat, (session,), out = make_chat(["too long", "short"])

    def failing(messages, **options):
        session.calls.append((messages, options))
        if len(session.calls) == 1:
            raise MrsError("the conversation no longer fits the context")
        yield "ok"

    session.stream = failing
    chat.run()
    assert "error: the conversation no longer fits" in out.getvalue()
    assert session.calls[1][0] == [{"role": "user", "content": "short"}]


def test_model_switches_model_and_keeps_the_conversation():
    chat, sessions, out = make_chat(["Hi", "/model acme/other", "/model", "Still there?"])
    chat.run()
    assert chat.model.name == "acme/other" and len(sessions) == 2
    assert sessions[1].calls[0][0][:2] == [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello there."}]
    assert "now chatting with acme/other" in out.getvalue() and "model: acme/other" in out.getvalue()


def test_triple_quotes_enter_several_lines(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('"""first line\nsecond line\nlast"""\n/exit\n'))
    read = terminal_reader(Console(file=io.StringIO()))
    assert read(">>> ") == "first line\nsecond line\nlast"
    assert read(">>> ") == "/exit"
    assert read(">>> ") is None


# -- the renderer -------------------------------------------------------------------------------

def test_finished_prefix_holds_back_the_block_still_growing():
    text = "# Title\n\nSome text\n\n```python\nx = 1\n"
    assert text[:finished_prefix(text)] == "# Title\n\nSome text\n\n"
    assert finished_prefix("just one paragraph") == 0


def test_outside_a_terminal_the_answer_is_written_as_plain_text():
    out = io.StringIO()
    with MarkdownStream(Console(file=out)) as stream:
        for piece in ("# Hi", "\n\n**bold**", " text"):
            stream.push(piece)
    assert out.getvalue() == "# Hi\n\n**bold** text\n"


def reference_screen(text: str, width: int) -> str:
    """What rich prints for the whole markdown at once, as a terminal shows it."""
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=True).print(Markdown(text, code_theme="monokai"))
    screen = Screen(width)
    screen.feed(buf.getvalue().replace("\n", "\r\n"))  # a tty turns \n into \r\n
    return screen.text()


def test_streamed_markdown_ends_as_exactly_one_clean_render_in_a_terminal(tmp_path):
    width, height = 70, 12  # shorter than the answer: the growing block is shown by its tail
    answer = tmp_path / "answer.md"
    answer.write_text(MARKDOWN_ANSWER)
    session = PtySession([PYTHON, str(REPO / "tests" / "fake_chat.py"), str(answer), "0.002"],
                         width=width, height=height, cwd=str(REPO))
    session.expect(">>> ", timeout=60)
    session.send("Show me fib\n")
    mark = session.mark()
    session.expect(">>> ", timeout=60, after=mark)  # the answer is done: the prompt is back
    session.send("/exit\n")
    assert session.wait(60) == 0
    screen = session.screen()
    answer_screen = screen.split("Show me fib\n", 1)[1].rsplit(">>> /exit", 1)[0]
    # no leftover frames, nothing twice: the screen is one clean render (then the blank line before the prompt)
    assert answer_screen == reference_screen(MARKDOWN_ANSWER, width) + "\n"
    assert "```" not in answer_screen and "**" not in answer_screen  # rendered, not raw


def test_ctrl_c_in_a_terminal_stops_the_answer_and_the_chat_goes_on(tmp_path):
    answer = tmp_path / "answer.md"
    answer.write_text("word " * 400)
    session = PtySession([PYTHON, str(REPO / "tests" / "fake_chat.py"), str(answer), "0.05"], cwd=str(REPO))
    session.expect(">>> ", timeout=60)
    session.send("Talk\n")
    session.expect("word", timeout=30)
    session.interrupt()
    session.expect("[answer stopped]", timeout=30)
    session.send("/history\n")
    session.expect("assistant: word", timeout=30)
    session.send("/exit\n")
    assert session.wait(60) == 0


# -- the real thing: a tiny Llama with a ChatML template --------------------------------------

def test_the_second_turn_prefills_only_its_new_tokens(llama_model):
    out = io.StringIO()
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories."
    feed = iter(["/set temperature 0", "/set max_tokens 6", story, "How are you?"])
    chat = Chat(llama_model, console=Console(file=out, width=200), read=lambda prompt: next(feed, None),
                show_stats=True)
    chat.run()
    tokenizer, messages = llama_model.tokenizer, chat.conversation.messages
    first = tokenizer.apply_chat_template(messages[:1])
    second = tokenizer.apply_chat_template(messages[:3])
    answer = messages[1]["content"]
    assert second.startswith(first + answer)
    new_text = second[len(first + answer):]  # the reply's end marker, the new message, the assistant header
    prefilled = chat.session.last_prefill_tokens
    # turn 1's prompt and answer come from the cache; what is prefilled is the new text, plus the last
    # token sampled in turn 1 when it was not EOS (sampled, shown, but never fed back in)
    expected = len(tokenizer.encode(new_text, add_special_tokens=False))
    assert prefilled in (expected, expected + 1)
    assert len(tokenizer.encode(second, add_special_tokens=False)) - prefilled >= len(
        tokenizer.encode(first, add_special_tokens=False))
    stats = [line for line in out.getvalue().splitlines() if "prefilled" in line]
    total = chat.session.last.prompt_tokens
    assert stats[-1].endswith(f"prompt {total} tokens: {prefilled} prefilled, {total - prefilled} cached")


def test_a_conversation_past_its_context_drops_its_oldest_turns_and_goes_on(llama_model):
    from mrs.engine.session import ChatSession

    out = io.StringIO()
    turns = [f"Message {i}: tell me more about the sea." for i in range(8)]
    feed = iter(["/system Be brief.", "/set temperature 0", "/set max_tokens 8", *turns])
    chat = Chat(llama_model, console=Console(file=out, width=200), read=lambda prompt: next(feed, None),
                make_session=lambda m: ChatSession(m, max_len=128), show_stats=True)
    chat.run()
    text = out.getvalue()
    assert "error" not in text
    shifts = [line for line in text.splitlines() if "outgrew the context of 128 tokens" in line]
    assert shifts, text
    messages = chat.conversation.messages
    # Every turn was answered; the oldest are gone, the newest kept, the system message stays.
    assert sum("outgrew" in line for line in text.splitlines()) == len(shifts)
    assert messages[-2] == {"role": "user", "content": turns[-1]} and messages[-1]["role"] == "assistant"
    assert turns[0] not in [m["content"] for m in messages]
    assert chat.conversation.prompt()[0] == {"role": "system", "content": "Be brief."}
    assert chat.session.prompt_tokens(chat.conversation.prompt()[:-1]) <= 128
    assert text.count("tok/s") == len(turns)     # a stats line per answered turn


def test_make_room_keeps_the_newest_message_and_drops_whole_turns(llama_model):
    from mrs.engine.session import ChatSession

    chat = Chat(llama_model, console=Console(file=io.StringIO()), read=lambda prompt: None,
                make_session=lambda m: ChatSession(m, max_len=64))
    c = chat.conversation
    c.options["max_tokens"] = 4
    c.messages = [{"role": "user", "content": "an old question " * 3}, {"role": "assistant", "content": "an answer"},
                  {"role": "user", "content": "the new one"}]
    assert chat.make_room() == 2 and c.messages == [{"role": "user", "content": "the new one"}]
    c.messages = [{"role": "user", "content": "far too long " * 40}]
    assert chat.make_room() == 0 and len(c.messages) == 1     # left to the session to refuse


def test_chat_session_file_is_saved_on_exit_and_reloaded(llama_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli.CLI, "_load", lambda self, ref, adapter=None: llama_model)
    file = tmp_path / "chat.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["run", "m", "--session", str(file), "--save-on-exit", "--max-tokens", "3", "--temperature", "0",
                 "--system", "Be brief."]) == 0
    saved = json.loads(file.read_text())
    assert saved["system"] == "Be brief." and [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["options"]["max_tokens"] == 3
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("/history\n"))
    assert main(["chat", "m", "--session", str(file)]) == 0
    out = capsys.readouterr().out
    assert "system: Be brief.\nuser: Hi\nassistant: " in out


def test_a_model_without_a_chat_template_cannot_chat(llama_model, monkeypatch, capsys):
    monkeypatch.setattr(llama_model.tokenizer, "chat_template", None)
    monkeypatch.setattr(cli.CLI, "_load", lambda self, ref, adapter=None: llama_model)
    assert main(["chat", "m", "Hello"]) == 1
    assert "no chat template" in capsys.readouterr().err


def test_chat_takes_its_model_as_model_like_generate(llama_model, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(cli.CLI, "_load", lambda self, ref, adapter=None: loaded.append(ref) or llama_model)
    options = ["--max-tokens", "4", "--temperature", "0"]
    assert main(["chat", "m", "Hello", *options]) == 0
    positional = capsys.readouterr().out
    assert main(["chat", "--model", "m", "Hello", *options]) == 0
    assert capsys.readouterr().out == positional and loaded == ["m", "m"]
    assert main(["chat", "--model", "m", "--prompt", "Hello", *options]) == 0
    assert capsys.readouterr().out == positional
    assert main(["chat"]) == 1 and "which model?" in capsys.readouterr().err
    assert main(["chat", "m", "--model", "m", "--prompt", "Hi"]) == 1
    assert "give the model once" in capsys.readouterr().err


def test_chat_in_a_pseudo_terminal_runs_past_its_context(llama_dir, tmp_path):
    session = PtySession([PYTHON, "-m", "mrs.cli", "chat", "--model", str(llama_dir), "--context", "96",
                          "--max-tokens", "6", "--temperature", "0"], cwd=str(tmp_path),
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XDG_STATE_HOME": str(tmp_path / "state")})
    session.expect(">>> ", timeout=120)
    for i in range(8):
        before = len(session.output)
        session.send(f"Turn {i} of a long talk about boats.\n")
        session.expect(">>> ", timeout=120, after=before)
    session.send("/exit\n")
    assert session.wait(60) == 0
    everything = session.text()
    assert "outgrew the context of 96 tokens" in everything and "error" not in everything


def test_chat_in_a_real_terminal(llama_dir, tmp_path):
    session = PtySession([PYTHON, "-m", "mrs.cli", "chat", str(llama_dir), "--max-tokens", "5", "--temperature", "0",
                          "--stats"], cwd=str(tmp_path), env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                              "XDG_STATE_HOME": str(tmp_path / "state")})
    session.expect(">>> ", timeout=120)
    session.send("Hello!\n")
    session.expect("prefilled", timeout=120)
    session.send("/history\n")
    session.expect("assistant:", timeout=30)
    session.send("/exit\n")
    assert session.wait(60) == 0
    screen = session.screen()
    assert "chatting with llama" in screen and "user: Hello!" in screen
    assert (tmp_path / "state" / "mrs" / "chat_history").is_file()  # readline history, for the next chat


def test_conversation_json_round_trip():
    c = Conversation(system="s", messages=[{"role": "user", "content": "u"}])
    c.options["seed"] = 5
    again = Conversation.from_json(json.loads(json.dumps(c.to_json("m"))), "x")
    assert again == c
