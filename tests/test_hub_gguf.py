"""Pulling one quant of a GGUF repo (``org/name-GGUF:Q8_0``, Ollama's hf.co convention) from
the local Hub stand-in: only that file comes, verified, and runs by its pulled name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mrs
from mrs import hub, store
from mrs.cli import main
from mrs.errors import ModelNotFoundError, NotAModelError

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import write_gguf  # noqa: E402

pytest_plugins = ["cli_helpers"]  # fixtures: fake_hub, hub_env, llama_dir


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="module")
def gguf_repo(fake_hub, fixture_path, repo_folder) -> str:
    folder = repo_folder
    files = {f"tiny-{q}.gguf": write_gguf(fixture_path("llama"), folder / f"tiny-{q}.gguf", "llama", q).read_bytes()
             for q in ("F32", "Q8_0")}
    fake_hub.add("acme/tiny-GGUF", files | {"README.md": b"# tiny"}, tags=["gguf"])
    return "acme/tiny-GGUF"


def test_pulling_a_quant_fetches_that_file_alone_and_it_runs_by_name(hub_env, gguf_repo, repo_folder, tmp_path):
    path = hub.pull(f"{gguf_repo}:Q8_0", tmp_path, endpoint=hub_env.url)
    assert path.name == "acme--tiny-GGUF--Q8_0" and store.model_files(path) == ["tiny-Q8_0.gguf"]
    assert not hub_env.gets("tiny-F32.gguf") and store.verify(path)["checked"] == 1
    model = mrs.load(f"{gguf_repo}:Q8_0", home=tmp_path)
    assert model.name == "acme/tiny-GGUF:Q8_0" and model.family.name == "llama"
    assert (path / "tiny-Q8_0.gguf").read_bytes() == (repo_folder / "tiny-Q8_0.gguf").read_bytes()
    ids = [1, 17, 42, 99, 7]
    assert mrs.generate(model, ids, max_tokens=6, temperature=0).token_ids == mrs.generate(
        mrs.load(repo_folder / "tiny-Q8_0.gguf"), ids, max_tokens=6, temperature=0).token_ids
    info = store.model_info(path)
    assert info["name"] == "acme/tiny-GGUF:Q8_0" and info["format"] == "gguf" and info["dtype"] == "Q8_0"
    assert [store.model_name(p) for p in store.list_models(tmp_path)] == ["acme/tiny-GGUF:Q8_0"]


def test_a_quant_the_repo_lacks_names_those_it_has(hub_env, gguf_repo, tmp_path):
    with pytest.raises(ModelNotFoundError, match="F32, Q8_0"):
        hub.pull(f"{gguf_repo}:Q4_K_M", tmp_path, endpoint=hub_env.url)
    with pytest.raises(NotAModelError, match=":QUANT"):
        hub.pull(gguf_repo, tmp_path, endpoint=hub_env.url)
    assert not store.list_models(tmp_path)


def test_mrs_pull_and_list_show_the_quant(hub_env, gguf_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MRS_HOME", str(tmp_path))
    assert main(["pull", f"{gguf_repo}:F32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["acme/tiny-GGUF:F32"] and rows[0]["architecture"] == "llama"
