"""Fixtures and helpers shared by the CLI, store, hub and chat tests (import what you use).

conftest.py belongs to the suite as a whole; these live here so the CLI-side tests can
be read and changed on their own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hub_server import FakeHub


@pytest.fixture(scope="session")
def llama_dir(fixture_path) -> Path:
    """The tiny Llama fixture folder (ChatML chat template), built by scripts/make_fixtures.py."""
    return fixture_path("llama")


@pytest.fixture(scope="session")
def llama_model(llama_dir):
    """The tiny Llama, loaded once: its compiled steps are shared by every test that runs it."""
    import mrs

    return mrs.load(str(llama_dir))


@pytest.fixture
def home(tmp_path, llama_dir, monkeypatch) -> Path:
    """A models directory holding one model, acme/tiny (a copy of the llama fixture).

    MRS_HOME points at it and MRS_CONFIG at a file that does not exist, so no user
    configuration leaks into a test.
    """
    models = tmp_path / "models"
    shutil.copytree(llama_dir, models / "acme--tiny")
    monkeypatch.setenv("MRS_HOME", str(models))
    monkeypatch.setenv("MRS_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.chdir(tmp_path)  # no stray .env
    return models


@pytest.fixture(scope="module")
def fake_hub(llama_dir) -> FakeHub:
    """A Hub stand-in on 127.0.0.1 with acme/tiny (main and tag v1) and a few search-only repos."""
    hub = FakeHub().start()
    extra = {
        "README.md": b"# acme/tiny\n",
        "pytorch_model.bin": b"\0" * 2048,
        ".gitattributes": b"*.bin lfs\n",
        "onnx/model.onnx": b"\1" * 512,
    }
    hub.add_folder("acme/tiny", llama_dir, extra, downloads=500, likes=7)
    config = (
        (llama_dir / "config.json").read_text().replace('"use_cache": true', '"use_cache": false')
    )
    hub.add_folder("acme/tiny", llama_dir, extra | {"config.json": config.encode()}, ref="v1")
    hub.add("acme/only-bin", {"config.json": b"{}", "pytorch_model.bin": b"\0" * 64}, downloads=3)
    hub.add(
        "acme/tiny-embed",
        {"config.json": b"{}", "model.safetensors": b"\0" * 64},
        pipeline_tag="sentence-similarity",
        tags=["safetensors", "bert"],
        downloads=900,
    )
    hub.add("other/tiny-gguf", {"model.gguf": b"\0"}, tags=["gguf"], downloads=10_000)
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """huggingface_hub as the tests need it: online (scripts/test.sh sets HF_HUB_OFFLINE=1), a private
    cache, small download chunks (so a cut download has bytes to resume from), MRS_MIRROR -> fake hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    monkeypatch.setenv("MRS_MIRROR", fake_hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    fake_hub.faults.clear()
    fake_hub.requests.clear()
    return fake_hub
