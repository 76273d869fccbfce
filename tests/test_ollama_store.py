"""Ollama's store, read-only: a store the test builds (manifests + blobs, with a GGUF written
from the llama fixture) runs by name from the API, the CLI and the server's resolver, `list`
shows it, and nothing in it is ever written."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

import mrs
from mrs import ollama_store
from mrs.cli import main
from mrs.engine.models import resolve_name
from mrs.errors import InvalidModelNameError, ModelNotFoundError, NotAModelError, UnsupportedModelError
from mrs.server.ollama import list_infos

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import write_gguf  # noqa: E402

PARAMS = {"temperature": 0, "top_k": 1, "stop": ["zzzz"]}
SYSTEM = "You answer in one word."


def blob(store: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def manifest(store: Path, name: str, tag: str, layers: list[dict], namespace: str = "library") -> Path:
    path = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return path


PROMPT = [1, 17, 42, 99]


@pytest.fixture(scope="module")
def greedy(fixture_path):
    """The folder model's greedy answer to PROMPT (what the store's model must give under its params)."""
    return mrs.generate(mrs.load(str(fixture_path("llama"))), PROMPT, max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def store_params(greedy) -> dict:
    """temperature 0 and top_k 1, and a stop string the greedy answer runs into: a params layer
    whose every option shows in the output."""
    assert len(greedy.text) >= 4, greedy.text
    return {"temperature": 0, "top_k": 1, "stop": [greedy.text[-3:]]}


@pytest.fixture(scope="module")
def store(fixture_path, tmp_path_factory, store_params) -> Path:
    root = tmp_path_factory.mktemp("ollama")
    gguf = write_gguf(fixture_path("llama"), root / "tiny.gguf", "llama")
    model = {"mediaType": ollama_store.MODEL, **blob(root, gguf.read_bytes())}
    gguf.unlink()
    params = {"mediaType": ollama_store.PARAMS, **blob(root, json.dumps(store_params).encode())}
    system = {"mediaType": ollama_store.SYSTEM, **blob(root, SYSTEM.encode())}
    manifest(root, "tiny", "latest", [model, params, system])
    manifest(root, "tiny", "q8", [model])
    manifest(root, "adapter-only", "latest",
             [{"mediaType": "application/vnd.ollama.image.adapter", **blob(root, b"lora")}])
    manifest(root, "gone", "latest", [{"mediaType": ollama_store.MODEL, "digest": "sha256:" + "0" * 64, "size": 1}])
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_names_resolve_to_the_gguf_blob_with_its_defaults(store, store_params):
    found = ollama_store.resolve("tiny", store)
    assert found.gguf.name.startswith("sha256-") and found.options == store_params and found.system == SYSTEM
    assert ollama_store.resolve("library/tiny:latest", store).gguf == found.gguf
    assert ollama_store.resolve("registry.ollama.ai/library/tiny:q8", store).options == {}
    for bad in ("../etc/passwd", "tiny:../../x", "a/b/c/d", "", ".hidden"):
        with pytest.raises(InvalidModelNameError):
            ollama_store.resolve(bad, store)
    with pytest.raises(ModelNotFoundError):
        ollama_store.resolve("absent", store)


def test_manifests_mrs_cannot_run_are_clear_errors(store):
    with pytest.raises(UnsupportedModelError, match="adapter"):
        ollama_store.resolve("adapter-only", store)
    with pytest.raises(NotAModelError, match="missing"):
        ollama_store.resolve("gone", store)


def test_an_ollama_model_runs_by_name_with_its_default_options(store, store_params, greedy, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    before = snapshot(store)
    model = mrs.load("tiny", home=tmp_path)
    assert model.name == "tiny:latest" and model.default_options == store_params and model.default_system == SYSTEM
    # greedy from the params layer, and cut at its stop string
    done = mrs.generate(model, PROMPT, max_tokens=8, ignore_eos=True)
    stop = store_params["stop"][0]
    assert done.finish_reason == "stop" and done.text == greedy.text[:greedy.text.find(stop)]
    assert done.token_ids == greedy.token_ids[:len(done.token_ids)]
    # the system layer is the system prompt of chat messages that bring none
    chat = [{"role": "user", "content": "hi"}]
    expected = model.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}] + chat)
    assert mrs.generate(model, chat, max_tokens=1).prompt_tokens == len(expected)
    assert mrs.generate(model, [{"role": "system", "content": "x"}] + chat, max_tokens=1).prompt_tokens < len(expected)
    assert resolve_name(tmp_path, "tiny") == ("tiny:latest", model.path)
    assert snapshot(store) == before


def test_the_cli_and_the_servers_list_show_ollamas_models(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("MRS_HOME", str(tmp_path))
    assert main(["generate", "hello", "--model", "tiny", "--max-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    tiny = next(r for r in rows if r["name"] == "tiny:latest")
    assert tiny["source"] == "ollama" and tiny["architecture"] == "llama" and tiny["parameters"] > 0
    assert any(r["name"] == "adapter-only:latest" and "error" in r for r in rows)
    assert {"tiny:latest", "tiny:q8"} <= {i["name"] for i in list_infos(tmp_path)}


def test_server_requests_take_the_models_defaults_where_they_set_nothing():
    from mrs.server.schemas import ollama_options

    row = ollama_options({}).with_defaults(PARAMS)
    assert row.sampling_row().temperature[0] == 0 and row.stop == ("zzzz",)
    mine = ollama_options({"options": {"temperature": 0.5, "stop": ["."]}}).with_defaults(PARAMS)
    assert abs(mine.sampling_row().temperature[0] - 0.5) < 1e-7 and mine.stop == (".",)
    assert mine.sampling_row().top_k[0] == 1           # what the request left unset
