"""Settings: defaults < config file < .env < MRS_* < flags, each value knowing its
source; `mrs config` init/validate/show/sources/env."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mrs import config
from mrs.cli import main
from mrs.errors import MrsError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No MRS_* variables, a config file path in tmp, and a cwd without a .env."""
    for key in list(__import__("os").environ):
        if key.startswith("MRS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MRS_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "config.toml"


def test_each_layer_overrides_the_one_before_and_is_named_as_the_source(clean_env, monkeypatch):
    clean_env.write_text('port = 1111\nmax_batch = 3\ndevice = "cpu"\nkeep_alive = "1h"\n')
    Path(".env").write_text("MRS_MAX_BATCH=4\nMRS_DEVICE=cpu\nMRS_KEEP_ALIVE=2h\n")
    monkeypatch.setenv("MRS_KEEP_ALIVE", "3h")
    s = config.Settings.load(dtype="float32", keep_alive="4h")
    assert (s.port, s.max_batch, s.keep_alive, s.dtype, s.host) == (
        1111,
        4,
        "4h",
        "float32",
        "127.0.0.1",
    )
    assert s.sources["port"] == f"config file {clean_env}"
    assert s.sources["max_batch"] == ".env .env"
    assert s.sources["keep_alive"] == "flag"
    assert s.sources["host"] == "default"
    monkeypatch.setenv("MRS_PORT", "2222")
    s = config.Settings.load()
    assert (s.port, s.sources["port"], s.keep_alive) == (2222, "environment", "3h")


def test_bad_values_and_unknown_flags_are_errors_that_name_the_source(clean_env, monkeypatch):
    monkeypatch.setenv("MRS_PORT", "eighty")
    with pytest.raises(MrsError, match="port from environment must be int"):
        config.Settings.load()
    monkeypatch.delenv("MRS_PORT")
    with pytest.raises(MrsError, match="unknown setting 'colour'"):
        config.Settings.load(colour="red")
    with pytest.raises(MrsError, match="device must be one of"):
        config.Settings.load(device="abacus")
    clean_env.write_text("port = [")
    with pytest.raises(MrsError, match="not valid TOML"):
        config.Settings.load()


def test_init_writes_a_commented_file_that_changes_nothing_and_is_valid(clean_env):
    path = config.init_file()
    assert path == clean_env
    text = path.read_text()
    assert "# port = 11434" in text and "(MRS_PORT)" in text
    assert tomllib.loads(text) == {}
    assert config.check_file(path) == []
    assert config.Settings.load() == config.Settings()


def test_init_refuses_to_overwrite_unless_forced(clean_env):
    clean_env.write_text("port = 1\n")
    with pytest.raises(MrsError, match="already exists"):
        config.init_file()
    assert clean_env.read_text() == "port = 1\n"
    config.init_file(force=True)
    assert "# port" in clean_env.read_text()


def test_validate_reports_every_problem_in_the_file(clean_env):
    clean_env.write_text('port = "x"\nwhat = 1\ndevice = "abacus"\n[server]\nx = 1\n')
    problems = config.check_file()
    assert any("port" in p and "int" in p for p in problems)
    assert any("unknown setting 'what'" in p for p in problems)
    assert any("'server'" in p for p in problems)
    clean_env.write_text('device = "abacus"\n')
    assert any("device must be one of" in p for p in config.check_file())
    clean_env.write_text("port = \n")
    assert "not valid TOML" in config.check_file()[0]
    clean_env.unlink()
    assert "does not exist" in config.check_file()[0]


def test_show_never_prints_the_api_key(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("MRS_API_KEY", "sk-very-secret")
    assert main(["config", "show"]) == 0
    assert main(["config", "sources"]) == 0
    assert main(["config", "env"]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret" not in out
    assert 'api_key = "********"' in out


def test_config_show_is_toml_of_the_effective_settings(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("MRS_MAX_BATCH", "5")
    assert main(["config"]) == 0  # show is the default action
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["max_batch"] == 5 and shown["port"] == 11434


def test_config_sources_names_where_each_value_came_from(clean_env, monkeypatch, capsys):
    clean_env.write_text("port = 1234\n")
    monkeypatch.setenv("MRS_MAX_BATCH", "5")
    assert main(["--dtype", "float32", "config", "sources"]) == 0
    rows = {
        line.split()[0]: line.split(maxsplit=2)[2]
        for line in capsys.readouterr().out.splitlines()[1:]
    }
    assert rows["port"] == f"config file {clean_env}"
    assert rows["max_batch"] == "environment"
    assert rows["dtype"] == "flag"
    assert rows["host"] == "default"


def test_config_cli_init_validate_env_and_path(clean_env, monkeypatch, capsys):
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(clean_env)
    assert main(["config", "init"]) == 0
    assert main(["config", "validate"]) == 0
    assert "is valid" in capsys.readouterr().out
    assert main(["config", "init"]) == 1
    assert "already exists" in capsys.readouterr().err
    clean_env.write_text("bogus = 1\n")
    assert main(["config", "validate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown setting 'bogus'" in err and err.count("\n") == 1
    monkeypatch.setenv("MRS_MIRROR", "http://127.0.0.1:1")
    assert main(["config", "env"]) == 0
    out = capsys.readouterr().out
    assert "MRS_MIRROR" in out and "http://127.0.0.1:1" in out and "MRS_HOME" in out


def test_config_rejects_an_unknown_action(clean_env, capsys):
    assert main(["config", "reset"]) == 1
    assert (
        "ACTION must be one of show, sources, init, validate, env, path" in capsys.readouterr().err
    )


def test_validate_checks_the_environment_too(clean_env, monkeypatch, capsys):
    config.init_file()
    monkeypatch.setenv("MRS_PORT", "-5")
    assert main(["config", "validate"]) == 1
    assert "port must be a positive integer" in capsys.readouterr().err
