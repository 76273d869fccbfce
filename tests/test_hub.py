"""Pulling from and searching a Hub: tested against a local stand-in (tests/hub_server.py)
that serves the routes huggingface_hub calls, with scripted cut and failed downloads."""

from __future__ import annotations

import json

import pytest

from mrs import hub, store
from mrs.errors import (
    InvalidModelNameError,
    ModelNotFoundError,
    MrsError,
    NotAModelError,
)

pytest_plugins = ["cli_helpers"]  # fixtures: fake_hub, hub_env, llama_dir

NEEDED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_pull_fetches_only_what_mrs_needs_and_records_checksums(hub_env, tmp_path, llama_dir):
    path = hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    assert path == tmp_path.resolve() / "acme--tiny"
    assert store.model_files(path) == NEEDED  # no README, no pickle, no onnx
    assert (path / "model.safetensors").read_bytes() == (
        llama_dir / "model.safetensors"
    ).read_bytes()
    assert store.verify(path)["checked"] == len(NEEDED)
    manifest = store.read_checksums(path)
    assert manifest["source"]["repo"] == "acme/tiny" and len(manifest["source"]["commit"]) == 40
    assert [p.name for p in store.list_models(tmp_path)] == ["acme--tiny"]
    assert not any(p.name.startswith(".partial") for p in tmp_path.iterdir())


def test_pull_reports_ollama_style_progress(hub_env, tmp_path):
    events = []
    hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url, on_progress=events.append)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    weights = [e for e in events if e["status"] == "pulling model.safetensors"]
    size = (tmp_path / "acme--tiny" / "model.safetensors").stat().st_size
    assert weights[0]["completed"] == 0 and weights[-1] == {
        "status": "pulling model.safetensors",
        "digest": "sha256:" + store.sha256_file(tmp_path / "acme--tiny" / "model.safetensors"),
        "total": size,
        "completed": size,
    }
    assert all(set(e) <= {"status", "digest", "total", "completed"} for e in events)
    assert all(json.dumps(e) for e in events)  # what /api/pull streams


def test_pull_a_revision(hub_env, tmp_path):
    path = hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url, revision="v1")
    assert json.loads((path / "config.json").read_text())["use_cache"] is False
    assert store.read_checksums(path)["source"]["revision"] == "v1"


def test_pulling_another_revision_updates_the_model_in_place(hub_env, tmp_path):
    hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    path = hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url, revision="v1")
    assert json.loads((path / "config.json").read_text())["use_cache"] is False
    store.verify(path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "acme--tiny"
    ]


def test_pulling_an_up_to_date_model_downloads_nothing(hub_env, tmp_path):
    hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    hub_env.requests.clear()
    hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    assert not [r for r in hub_env.requests if "/resolve/" in r[1]]


def test_a_cut_download_is_resumed_with_a_range_request(hub_env, tmp_path):
    hub_env.faults["model.safetensors"] = ["cut"]
    path = hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    ranges = hub_env.gets("model.safetensors")
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][len("bytes=") :].rstrip("-")) > 0
    store.verify(path)


def test_a_download_cut_off_for_good_leaves_nothing_in_list_and_a_second_pull_completes_it(
    hub_env, tmp_path
):
    hub_env.faults["model.safetensors"] = ["cut", "fail"]  # cut midway, and the resume fails too
    with pytest.raises(MrsError):
        hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    assert store.list_models(tmp_path) == []
    assert not (tmp_path / "acme--tiny").exists()
    partial = tmp_path / ".partial-acme--tiny"
    assert (partial / "config.json").is_file() and not (partial / "model.safetensors").exists()

    hub_env.requests.clear()
    path = hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    assert [p.name for p in store.list_models(tmp_path)] == ["acme--tiny"]
    store.verify(path)
    assert not partial.exists()
    fetched = {
        p.rsplit("/", 1)[1] for m, p, _ in hub_env.requests if m == "GET" and "/resolve/" in p
    }
    assert fetched == {"model.safetensors"}  # the finished small files were kept


def test_a_file_that_does_not_match_the_hub_checksum_is_not_installed(hub_env, tmp_path):
    hub_env.faults["tokenizer.json"] = ["corrupt"]
    with pytest.raises(store.ChecksumError, match="tokenizer.json"):
        hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
    assert store.list_models(tmp_path) == []
    hub.pull(
        "acme/tiny", tmp_path, endpoint=hub_env.url
    )  # the bad file was dropped: this fetches it again
    store.verify(tmp_path / "acme--tiny")


def test_a_missing_repo_is_model_not_found(hub_env, tmp_path):
    with pytest.raises(ModelNotFoundError, match="acme/nope"):
        hub.pull("acme/nope", tmp_path, endpoint=hub_env.url)
    assert ModelNotFoundError.http_status == 404


def test_a_missing_revision_is_model_not_found(hub_env, tmp_path):
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url, revision="v9")


def test_a_repo_without_safetensors_fails_before_downloading(hub_env, tmp_path):
    with pytest.raises(NotAModelError, match="safetensors"):
        hub.pull("acme/only-bin", tmp_path, endpoint=hub_env.url)
    assert not [r for r in hub_env.requests if r[1].endswith("pytorch_model.bin")]


def test_an_unreachable_hub_is_a_clear_error(tmp_path, hub_env):
    with pytest.raises(hub.HubError, match="cannot reach"):
        hub.pull("acme/tiny", tmp_path, endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("ref", ["../evil", "acme/../../x", "a/b/c", ""])
def test_pull_rejects_names_that_are_not_repo_ids(tmp_path, ref):
    with pytest.raises(InvalidModelNameError):
        hub.pull(ref, tmp_path, endpoint="http://127.0.0.1:9")


def test_hub_urls_are_accepted_as_names():
    assert hub.repo_id("https://huggingface.co/acme/tiny") == "acme/tiny"
    assert hub.repo_id("hf.co/acme/tiny/") == "acme/tiny"


def test_the_mirror_setting_is_the_default_endpoint(hub_env, tmp_path):
    path = hub.pull("acme/tiny", tmp_path)  # no endpoint: MRS_MIRROR points at the fake hub
    assert path.is_dir()


def test_select_files_takes_the_shards_the_index_names_and_skips_duplicates():
    entries = dict.fromkeys(
        [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "1_Pooling/config.json",
            "modules.json",
            "original/params.json",
        ]
    )
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    assert hub.select_files(entries, index) == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "1_Pooling/config.json",
        "config.json",
        "modules.json",
        "tokenizer.json",
    ]
    single = dict.fromkeys(["config.json", "model.safetensors", "consolidated.safetensors"])
    assert hub.select_files(single, None) == ["model.safetensors", "config.json"]


def test_search_lists_runnable_models_most_downloaded_first(hub_env):
    rows = hub.search("tiny", endpoint=hub_env.url)
    assert [r["id"] for r in rows] == ["acme/tiny-embed", "acme/tiny"]  # no gguf-only repo
    assert rows[1] == {
        "id": "acme/tiny",
        "task": "text-generation",
        "downloads": 500,
        "likes": 7,
        "modified": rows[1]["modified"],
    }
    assert hub.search("tiny", endpoint=hub_env.url, limit=1)[0]["id"] == "acme/tiny-embed"
    assert hub.search("tiny", endpoint=hub_env.url, task="text-generation")[0]["id"] == "acme/tiny"
    assert hub.search("zzz", endpoint=hub_env.url) == []


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"limit": "5"}, {"task": "image"}])
def test_search_validates_its_arguments(kwargs):
    with pytest.raises(MrsError):
        hub.search("x", endpoint="http://127.0.0.1:9", **kwargs)


def test_offline_mode_is_named_as_the_reason(hub_env, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        hub.pull("acme/tiny", tmp_path, endpoint=hub_env.url)
