"""The `mrs` command line: each command in-process through mrs.cli.main (fast), and a few
real `python -m mrs.cli` runs for exit codes, help without a pager, and a real `serve`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from cli_process import PYTHON, REPO, run_mrs
from term_screen import PtySession

import mrs
from mrs import cli, store
from mrs.cli import main
from mrs.render import ago

pytest_plugins = ["cli_helpers"]  # fixtures: home, llama_dir, llama_model, fake_hub, hub_env


def one_error_line(err: str) -> str:
    """stderr of a failed command: exactly one line, 'error: ...', no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def last_error_line(err: str) -> str:
    """stderr of a failed command that showed progress first: it ends with one 'error: ...' line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1]


# -- list / show -------------------------------------------------------------------------


def test_list_shows_name_architecture_parameters_dtype_size_modified(home, capsys):
    assert main(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "SIZE", "MODIFIED"]
    assert row.split()[:4] == [
        "acme/tiny",
        "LlamaForCausalLM",
        store.model_info(home / "acme--tiny")["parameter_size"],
        "float32",
    ]
    assert row.endswith(ago(store.model_info(home / "acme--tiny")["modified"]))


def test_ls_is_list_and_json_is_model_info(home, capsys):
    assert main(["ls", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [store.model_info(home / "acme--tiny")]


def test_list_marks_a_broken_model_instead_of_failing(home, capsys):
    (home / "acme--broken").mkdir()
    (home / "acme--broken" / "config.json").write_text("{}")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "acme/broken" in out and "broken:" in out and "acme/tiny" in out


def test_list_of_an_empty_directory_says_how_to_get_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MRS_HOME", str(tmp_path / "empty"))
    assert main(["list"]) == 0
    assert "mrs pull" in capsys.readouterr().err


def test_show_summarises_config_parameters_context_template_and_files(home, capsys):
    assert main(["show", "acme/tiny"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "LlamaForCausalLM (llama)",
        "context length    2048",
        "chat template     yes",
        "model.safetensors",
        "tokenizer.json",
        "sha256:",
        "attention heads   4 (kv 2)",
    ):
        assert expected in out, expected
    assert main(["info", str(home / "acme--tiny"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "acme/tiny"
    assert main(["show", "acme/tiny", "--template"]) == 0
    assert "<|im_start|>" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "acme/nope"], "model 'acme/nope' not found"),
        (["show", "acme/../../etc"], "escape the models directory"),
    (["show", "../etc"], "model folder ../etc does not exist"),
        (["show", "acme/tiny", "--format", "yaml"], "--format must be one of text, json"),
        (["list", "--format", "csv"], "--format must be one of table, json"),
    ],
)
def test_show_and_list_errors_are_one_line(home, capsys, args, message):
    assert main(args) == 1
    assert message in one_error_line(capsys.readouterr().err)


# -- rm / cp / verify / checksums ------------------------------------------------------------


def test_rm_asks_first_and_keeps_the_model_on_no(home, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert main(["rm", "acme/tiny"]) == 1
    err = capsys.readouterr().err
    assert "Remove acme/tiny" in err and "nothing removed" in err
    assert (home / "acme--tiny").is_dir()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert main(["rm", "acme/tiny"]) == 0
    assert not (home / "acme--tiny").exists()


def test_rm_yes_removes_without_asking(home, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nothing to read: it must not ask
    assert main(["rm", "acme/tiny", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == "removed acme/tiny"
    assert store.list_models(home) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rm", "acme/nope", "--yes"], "model 'acme/nope' not found"),
        (["rm", "../models", "--yes"], "escape the models directory"),
        (["rm", "/etc", "--yes"], "invalid model name '/etc'"),
        (["rm", "--yes"], "name the model(s) to remove"),
        (["cp", "acme/nope", "me/x"], "model 'acme/nope' not found"),
        (["cp", "acme/tiny", "../x"], "escape the models directory"),
        (["cp", "acme/tiny", "acme/tiny"], "already exists"),
        (["verify", "acme/nope"], "not found"),
        (["verify", "acme/tiny"], "no checksum manifest"),
    ],
)
def test_rm_cp_verify_errors_are_one_line_and_change_nothing(home, capsys, args, message):
    before = sorted(p.name for p in home.iterdir())
    assert main(args) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in home.iterdir()) == before


def test_cp_copies_under_the_new_name(home, capsys):
    assert main(["cp", "acme/tiny", "me/tiny"]) == 0
    assert capsys.readouterr().out.strip() == "copied acme/tiny to me/tiny"
    assert [p.name for p in store.list_models(home)] == ["acme--tiny", "me--tiny"]


def test_checksums_then_verify_then_corruption_is_detected(home, capsys):
    assert main(["checksums", "acme/tiny"]) == 0  # first time: computes and writes the manifest
    out = capsys.readouterr().out.splitlines()
    weights = home / "acme--tiny" / "model.safetensors"
    assert f"{store.sha256_file(weights)}  model.safetensors" in out
    assert main(["verify", "acme/tiny"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["verify", "acme/tiny"]) == 1
    assert "model.safetensors does not match its SHA-256" in one_error_line(capsys.readouterr().err)
    assert main(["checksums", "acme/tiny", "--write"]) == 0  # the user vouches for the new bytes
    assert main(["verify", "acme/tiny"]) == 0


# -- pull / search -------------------------------------------------------------------------


def test_pull_downloads_into_the_models_directory_and_list_shows_it(home, hub_env, capsys):
    store.remove(home, "acme/tiny")
    assert main(["download", "acme/tiny"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"pulled acme/tiny into {home.resolve() / 'acme--tiny'}"
    assert "model.safetensors" in captured.err  # the progress display
    assert main(["list", "--format", "json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["acme/tiny"]


def test_pull_errors_are_one_line(home, hub_env, capsys):
    assert main(["pull", "acme/nope"]) == 1
    assert "model 'acme/nope' not found" in last_error_line(capsys.readouterr().err)
    assert main(["pull", "acme/tiny", "--revision", "v9"]) == 1
    assert "revision 'v9'" in last_error_line(capsys.readouterr().err)
    assert main(["pull", "acme/tiny", "--revison", "v1"]) == 1  # a typo fails before anything runs
    assert "unknown flag --revison for `mrs pull`" in one_error_line(capsys.readouterr().err)
    assert not [r for r in hub_env.requests if "/api/models/acme/tiny" in r[1] and "v1" in r[1]]


def test_search_prints_a_table(hub_env, capsys):
    assert main(["search", "tiny", "--limit", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["MODEL", "TASK", "DOWNLOADS", "LIKES", "UPDATED"]
    assert out[1].split()[:3] == ["acme/tiny-embed", "sentence-similarity", "900"]
    assert out[2].split()[:3] == ["acme/tiny", "text-generation", "500"]
    assert main(["search", "tiny", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["search", "tiny", "--limit", "many"]) == 1
    assert "--limit must be an integer" in one_error_line(capsys.readouterr().err)


# -- ps / serve / embed / generate ---------------------------------------------------------


@pytest.fixture
def ps_server():
    body = {
        "models": [
            {
                "name": "acme/tiny",
                "model": "acme/tiny",
                "size": 2_000_000,
                "size_vram": 0,
                "digest": "sha256:ab",
                "context_length": 2048,
                "expires_at": "2999-01-01T00:00:00Z",
                "details": {},
            }
        ]
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = json.dumps(body if self.path == "/api/ps" else {"error": "nope"}).encode()
            self.send_response(200 if self.path == "/api/ps" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


def test_ps_lists_the_models_a_server_has_loaded(ps_server, monkeypatch, capsys):
    url, body = ps_server
    port = url.rsplit(":", 1)[1]
    monkeypatch.setenv("MRS_PORT", port)
    assert main(["ps"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.split()[:5] == ["acme/tiny", "2.0", "MB", "100%", "CPU"] and "Forever" in row
    assert main(["ps", "--url", url, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == body["models"]


def test_ps_without_a_server_says_how_to_start_one(capsys):
    assert main(["ps", "--url", "http://127.0.0.1:9"]) == 1
    assert "mrs serve" in one_error_line(capsys.readouterr().err)
    assert main(["ps", "--url", "ftp://x"]) == 1
    assert "--url must start with http" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def fake_server_module(monkeypatch):
    """Stand in for mrs.server.app so `serve` can be checked without starting a server."""
    calls = []
    module = types.ModuleType("mrs.server.app")
    module.serve = lambda settings, models=(), preload=False, adapter=None: calls.append(
        (settings, list(models), preload)
    )
    monkeypatch.setitem(sys.modules, "mrs.server.app", module)
    return calls


def test_serve_passes_models_and_overrides_to_the_server(home, fake_server_module):
    assert (
        main(
            [
                "serve",
                "--model",
                "acme/tiny",
                "--port",
                "8123",
                "--host",
                "0.0.0.0",
                "--max-batch",
                "3",
                "--preload",
            ]
        )
        == 0
    )
    ((settings, models, preload),) = fake_server_module
    assert (settings.port, settings.host, settings.max_batch, models, preload) == (
        8123,
        "0.0.0.0",
        3,
        ["acme/tiny"],
        True,
    )
    assert settings.sources["port"] == "flag"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "--port must be from 0 to 65535"),
        (["serve", "--port", "http"], "--port must be an integer"),
        (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["serve", "--model", "acme/nope"], "model 'acme/nope' not found"),
        (["serve", "--preload"], "--preload needs --model"),
        (["serve", "--modle", "acme/tiny"], "unknown flag --modle"),
    ],
)
def test_serve_validates_its_arguments_before_starting(
    home, fake_server_module, capsys, args, message
):
    assert main(args) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert fake_server_module == []


def test_embed_prints_the_vectors_transformers_computes(fixture_path, capsys):
    folder = fixture_path("bert")  # a sentence-transformers layout: mean pooling, then Normalize
    texts = json.loads((folder / "texts.json").read_text())
    golden = np.load(folder / "golden.npz")["embeddings"]  # transformers' masked mean, L2-normalised
    assert main(["embed", *texts, "--model", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    model = mrs.load(str(folder))
    assert out["model"] == model.name and set(out) == {"model", "embeddings"}
    np.testing.assert_allclose(out["embeddings"], golden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["embeddings"], mrs.embed(model, texts), atol=1e-6, rtol=0)


def test_embed_needs_text(capsys):
    assert main(["embed", "--model", "x"]) == 1
    assert "at least one TEXT" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def shared_load(llama_model, monkeypatch):
    """CLI commands get the already compiled model (loading is tested elsewhere; compiling is slow)."""
    refs = []

    def load(self, ref, adapter=None):
        refs.append(ref)
        return llama_model

    monkeypatch.setattr(cli.CLI, "_load", load)
    return refs


# `mrs generate`'s documented defaults: the reference runs below pass them to mrs.generate as well.
GENERATE_DEFAULTS = {"top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0}
GREEDY = {"max_tokens": 8, "temperature": 0.0}
SAMPLED = {"max_tokens": 12, "temperature": 1.0, "seed": 7}


def flags(options: dict) -> list[str]:
    """{"max_tokens": 8} -> ["--max-tokens", "8"]."""
    return [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def generate_json(capsys, prompt: str, *args: str) -> dict:
    """`mrs generate PROMPT --model m ARGS --format json`, in-process: the object it printed."""
    assert main(["generate", prompt, "--model", "m", *args, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out.pop("tokens_per_second") > 0
    return out


def printed(model, done) -> dict:
    """What `--format json` must print for the Completion `done` (less the timing)."""
    return {"model": model.name, "text": done.text, "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}


def mrs_generate(model, prompt, **options):
    """The in-process reference: mrs.generate with the CLI's defaults under `options`."""
    return mrs.generate(model, prompt, **{**GENERATE_DEFAULTS, **options})


def test_generate_format_json_prints_the_completion_mrs_generate_gives(shared_load, llama_model, capsys):
    out = generate_json(capsys, "Hello", "--raw", *flags(GREEDY))
    expected = mrs_generate(llama_model, "Hello", **GREEDY)
    assert expected.text and expected.completion_tokens == GREEDY["max_tokens"]  # nothing vacuous
    assert out == printed(llama_model, expected)
    assert shared_load == ["m"]


@pytest.mark.parametrize(
    "option",
    [{"top_k": 1}, {"min_p": 0.5}, {"repeat_penalty": 2.0}],
    ids=lambda option: next(iter(option)),
)
def test_each_sampling_flag_reaches_mrs_generate(shared_load, llama_model, capsys, option):
    out = generate_json(capsys, "Hello", "--raw", *flags(SAMPLED | option))
    expected = mrs_generate(llama_model, "Hello", **SAMPLED, **option)
    assert out == printed(llama_model, expected)
    # The flag changes this seeded answer, so a CLI that dropped it would print another text.
    assert expected.text != mrs_generate(llama_model, "Hello", **SAMPLED).text


def test_stop_splits_on_commas_into_several_stop_strings(shared_load, llama_model, capsys):
    full = mrs_generate(llama_model, "Hello", **GREEDY).text
    first, second = re.findall(r"[A-Za-z]{3,}", full)[:2]  # two words of the answer, in order
    out = generate_json(capsys, "Hello", "--raw", *flags(GREEDY), "--stop", f"{second},{first}")
    expected = mrs_generate(llama_model, "Hello", **GREEDY, stop=[second, first])
    assert out == printed(llama_model, expected)
    # The answer ends before the earlier stop word, though it was named second: both were stops.
    assert expected.text == full[: full.index(first)] and expected.finish_reason == "stop"


def test_system_flag_puts_a_system_message_before_the_prompt(shared_load, llama_model, capsys):
    system, prompt = "You answer in one word.", "Hello"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    out = generate_json(capsys, prompt, "--system", system, *flags(GREEDY))
    expected = mrs_generate(llama_model, messages, **GREEDY)
    assert out == printed(llama_model, expected)
    assert out["prompt_tokens"] == len(llama_model.tokenizer.encode_chat(messages))
    assert expected.text != mrs_generate(llama_model, messages[1:], **GREEDY).text


def test_chat_with_a_prompt_prints_the_answer_to_its_messages_and_exits(shared_load, llama_model, capsys):
    system, prompt = "You answer in one word.", "Hello"
    args = ["--system", system, "--max-tokens", "6", "--temperature", "1", "--seed", "11"]
    assert main(["chat", "m", prompt, *args]) == 0
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    expected = mrs_generate(llama_model, messages, max_tokens=6, temperature=1.0, seed=11)
    assert expected.text.strip()
    assert capsys.readouterr().out == expected.text.removesuffix("\n") + "\n"  # into a pipe: the raw text


def test_generate_json_mode_writes_only_json(shared_load, llama_model, capsys):
    from mrs.constrain import START, feed

    options = {"max_tokens": 12, "temperature": 1.0, "seed": 3}
    assert main(["generate", "Hello", "--model", "m", *flags(options), "--json-mode", "--raw"]) == 0
    out = capsys.readouterr().out
    expected = mrs_generate(llama_model, "Hello", **options, format="json").text
    assert out == expected + "\n" and expected.startswith("{")
    state = START
    for byte in expected.encode("utf-8"):  # every byte continues one JSON object
        state = feed(state, byte)
        assert state is not None


def test_generate_reads_the_prompt_from_stdin_when_it_is_a_dash(
    shared_load, llama_model, monkeypatch, capsys
):
    expected = mrs_generate(llama_model, "Hello", **GREEDY)
    assert expected.text
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert generate_json(capsys, "-", "--raw", *flags(GREEDY)) == printed(llama_model, expected)
    assert main(["generate", "Hello", "--model", "m", "--raw", *flags(GREEDY)]) == 0
    assert capsys.readouterr().out == expected.text + "\n"  # --format text streams the same text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--model", "m", "--format", "xml"], "--format must be text or json"),
        (["generate", "hi", "--model", "m", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--model", "m", "--top-p", "5"], "top_p"),
        (["chat", "m", "--temperature", "-1"], "temperature must be"),
        (["chat", "m", "--save-on-exit"], "--save-on-exit needs --session"),
    ],
)
def test_generate_and_chat_validate_arguments(shared_load, capsys, args, message):
    assert main(args) == 1
    assert message in one_error_line(capsys.readouterr().err)


# -- real processes --------------------------------------------------------------------------


def test_help_lists_the_commands_and_exits_zero():
    result = run_mrs("--help")
    assert result.returncode == 0
    text = result.stdout + result.stderr
    for command in (
        "pull",
        "search",
        "list",
        "show",
        "rm",
        "cp",
        "ps",
        "verify",
        "checksums",
        "config",
        "chat",
        "generate",
        "embed",
        "serve",
    ):
        assert f"\n     {command}\n" in text, command


def test_help_on_a_terminal_does_not_open_a_pager():
    session = PtySession(
        [PYTHON, "-m", "mrs.cli", "pull", "-h"],
        env={"PAGER": "echo PAGED-BY-PAGER", "JAX_PLATFORMS": "cpu"},
        cwd=str(REPO),
    )
    assert session.wait(120) == 0
    screen = session.screen()
    assert "PAGED-BY-PAGER" not in screen
    assert "--revision" in screen and "SYNOPSIS" in screen


def test_a_failing_command_exits_non_zero_with_one_line(tmp_path):
    result = run_mrs("rm", "acme/nope", "--yes", env={"MRS_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "model 'acme/nope' not found" in one_error_line(result.stderr)


def test_an_unknown_command_is_one_line(capsys):
    assert main(["frobnicate"]) == 1
    assert "unknown command 'frobnicate'" in one_error_line(capsys.readouterr().err)


# `serve` prints this line (stderr) once it accepts requests, with the port it bound.
ANNOUNCED = re.compile(r"^mrs serving .* on (http://127\.0\.0\.1:\d+)$", re.MULTILINE)


def announced_url(server: subprocess.Popen, log, timeout: float) -> str:
    """Wait (polling, with a deadline) until the server's log announces its address."""
    deadline = time.monotonic() + timeout
    while not (found := ANNOUNCED.search(log.read_text(errors="replace"))):
        assert server.poll() is None, f"the server exited early:\n{log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text(errors='replace')}"
        time.sleep(0.2)
    return found.group(1)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_serve_runs_the_real_server_and_it_answers_as_mrs_generate(home, llama_model, capsys):
    store.copy(home, "acme/tiny", "acme/other")  # two models: --model names the default one
    # Port 0: the server binds a free port itself and announces it, so no port is raced for. Its
    # output goes to a file (a pipe nobody reads would fill and block it), read for the announcement.
    log = home.parent / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [PYTHON, "-m", "mrs.cli", "serve", "--model", "acme/tiny", "--port", "0"],
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},  # this checkout's mrs
            cwd=str(home.parent), stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = announced_url(server, log, timeout=180)
        assert main(["ps", "--url", url, "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == []  # nothing loaded until a request needs it
        raw = post_json(f"{url}/v1/completions", {"model": "acme/tiny", "prompt": "Hello", **GREEDY})
        expected = mrs.generate(llama_model, "Hello", **GREEDY)
        assert expected.text
        assert [(c["text"], c["finish_reason"]) for c in raw["choices"]] == [
            (expected.text, expected.finish_reason)]
        assert (raw["usage"]["prompt_tokens"], raw["usage"]["completion_tokens"]) == (
            expected.prompt_tokens, expected.completion_tokens)
        # mrs's own route, naming no model: the --model one answers, through its chat template.
        chat = post_json(f"{url}/v1/generate", {"prompt": "Hello", **GREEDY})
        expected = mrs.generate(llama_model, [{"role": "user", "content": "Hello"}], **GREEDY)
        assert chat == printed(llama_model, expected) | {"model": "acme/tiny", "cached_tokens": 0}
        assert main(["ps", "--url", url, "--format", "json"]) == 0
        assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["acme/tiny"]
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C stops the server cleanly
        try:
            assert server.wait(60) in (0, 130), log.read_text(errors="replace")
        finally:
            if server.poll() is None:
                server.kill()
