"""The models directory: names, model_info from headers, rm/cp that never leave half a
model, and SHA-256 manifests that catch corrupted files."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mrs import store
from mrs.errors import (
    InvalidModelNameError,
    ModelNotFoundError,
    MrsError,
    NotAModelError,
)

pytest_plugins = ["cli_helpers"]  # fixtures: home, llama_dir


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../b",
        "/etc",
        "a/b/c",
        "..",
        ".hidden",
        "org/.x",
        "a--b",
        "",
        "sp ace",
        "a\\b",
        "x" * 201,
    ],
)
def test_names_that_could_escape_the_models_directory_are_rejected(tmp_path, name):
    with pytest.raises(InvalidModelNameError):
        store.model_dir(tmp_path, name)


def test_org_model_names_map_to_double_dash_folders(tmp_path):
    assert store.model_dir(tmp_path, "acme/tiny") == tmp_path.resolve() / "acme--tiny"
    assert store.model_name("acme--tiny") == "acme/tiny"
    assert store.model_dir(tmp_path, "tiny").name == "tiny"


def test_model_info_reads_parameters_from_safetensors_headers_without_loading(home):
    info = store.model_info(home / "acme--tiny")
    config = json.loads((home / "acme--tiny" / "config.json").read_text())
    # tied Llama: embed + per layer (4 attention projections + 3 MLP + 2 norms) + final norm
    d, inter, layers, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    head_dim, kv = config["head_dim"], config["num_key_value_heads"]
    attn = d * d * 2 + 2 * d * kv * head_dim
    expected = vocab * d + layers * (attn + 3 * d * inter + 2 * d) + d
    assert info["parameters"] == expected
    assert info["parameter_size"].endswith("K")
    assert info["name"] == "acme/tiny"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == info["family"] == "llama"
    assert info["dtype"] == "float32"
    assert info["context_length"] == config["max_position_embeddings"]
    assert info["chat_template"] is True
    assert "model.safetensors" in info["files"] and "config.json" in info["files"]
    assert info["size_bytes"] == sum(
        (home / "acme--tiny" / f).stat().st_size for f in info["files"]
    )
    assert isinstance(info["modified"], float)
    assert info["digest"].startswith("sha256:") and len(info["digest"]) == 7 + 64


def test_model_info_names_what_is_missing(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(NotAModelError, match="config.json"):
        store.model_info(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(NotAModelError, match="pickle"):
        store.model_info(tmp_path / "m")


def test_a_truncated_safetensors_header_is_reported_not_crashed_on(home):
    (home / "acme--tiny" / "model.safetensors").write_bytes(b"\x10\0\0")
    with pytest.raises(MrsError, match="model.safetensors"):
        store.model_info(home / "acme--tiny")


def test_hidden_folders_and_files_are_not_models_or_model_files(home):
    (home / ".partial-acme--half").mkdir()
    (home / ".partial-acme--half" / "config.json").write_text("{}")
    (home / "acme--tiny" / ".cache").mkdir()
    (home / "acme--tiny" / ".cache" / "junk").write_text("x")
    assert [p.name for p in store.list_models(home)] == ["acme--tiny"]
    assert not any(f.startswith(".") for f in store.model_files(home / "acme--tiny"))


def test_remove_deletes_the_whole_folder(home):
    store.remove(home, "acme/tiny")
    assert not (home / "acme--tiny").exists()
    assert list(home.iterdir()) == []  # no trash left behind


def test_remove_of_an_unknown_model_is_model_not_found(home):
    with pytest.raises(ModelNotFoundError, match="acme/nope"):
        store.remove(home, "acme/nope")


def test_remove_refuses_names_that_escape(home, tmp_path):
    with pytest.raises(InvalidModelNameError, match="escape"):
        store.remove(home, "../models")
    assert (home / "acme--tiny").is_dir()


def test_remove_of_a_symlinked_model_drops_the_link_not_the_files(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(home / "acme--tiny", elsewhere)
    os.symlink(elsewhere, home / "acme--tiny")
    assert store.resolve("acme/tiny", home) == home.resolve() / "acme--tiny"
    store.remove(home, "acme/tiny")
    assert not (home / "acme--tiny").exists() and (elsewhere / "config.json").is_file()


def test_copy_makes_an_independent_model_under_the_new_name(home):
    target = store.copy(home, "acme/tiny", "me/tiny-copy")
    assert target == home.resolve() / "me--tiny-copy"
    assert (
        store.model_info(target)["parameters"]
        == store.model_info(home / "acme--tiny")["parameters"]
    )
    (target / "config.json").write_text("{}")
    assert json.loads((home / "acme--tiny" / "config.json").read_text())["model_type"] == "llama"


def test_copy_errors_unknown_source_bad_name_existing_target(home):
    with pytest.raises(ModelNotFoundError):
        store.copy(home, "acme/nope", "me/x")
    with pytest.raises(InvalidModelNameError):
        store.copy(home, "acme/tiny", "../outside")
    store.copy(home, "acme/tiny", "me/x")
    with pytest.raises(store.ModelExistsError, match="already exists"):
        store.copy(home, "acme/tiny", "me/x")
    assert issubclass(store.ModelExistsError, MrsError)


def test_an_interrupted_copy_leaves_nothing_half_written(home, monkeypatch):
    real_copytree, calls = shutil.copytree, []

    def copy_then_fail(src, dst, **kw):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the copy
        return shutil.copy2(src, dst, **kw)

    monkeypatch.setattr(
        shutil, "copytree", lambda *a, **kw: real_copytree(*a, **kw, copy_function=copy_then_fail)
    )
    with pytest.raises(KeyboardInterrupt):
        store.copy(home, "acme/tiny", "me/half")
    assert sorted(p.name for p in home.iterdir()) == ["acme--tiny"]


def test_checksums_manifest_round_trips_and_verify_passes(home):
    path = home / "acme--tiny"
    manifest = store.write_checksums(path)
    assert set(manifest["files"]) == set(store.model_files(path))
    assert store.read_checksums(path) == manifest
    assert store.verify(path) == {"checked": len(manifest["files"]), "unlisted": []}


def test_verify_detects_a_corrupted_file_of_the_same_size(home):
    path = home / "acme--tiny"
    store.write_checksums(path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(store.ChecksumError, match=r"model.safetensors does not match its SHA-256"):
        store.verify(path)


def test_verify_detects_missing_and_truncated_files_and_notes_new_ones(home):
    path = home / "acme--tiny"
    store.write_checksums(path)
    (path / "tokenizer.json").unlink()
    (path / "config.json").write_text("{}")
    with pytest.raises(store.ChecksumError) as e:
        store.verify(path)
    assert "tokenizer.json is missing" in str(e.value) and "config.json has" in str(e.value)
    store.write_checksums(path)
    (path / "chat_template.jinja").write_text("{{ messages }}")
    assert store.verify(path)["unlisted"] == ["chat_template.jinja"]


def test_verify_without_a_manifest_says_how_to_make_one(home):
    with pytest.raises(store.ChecksumError, match="checksums"):
        store.verify(home / "acme--tiny")


def test_digest_is_stable_and_follows_the_manifest(home):
    path = home / "acme--tiny"
    before = store.digest(path)
    assert store.digest(path) == before
    store.write_checksums(path)
    with_manifest = store.digest(path)
    assert with_manifest != before
    copy = store.copy(home, "acme/tiny", "me/copy")
    assert store.digest(copy) == with_manifest  # a copy is the same model, as in Ollama
