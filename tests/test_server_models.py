"""The loaded-model cache (mrs.engine.models.ModelManager) with a fake loader: no JAX, exact timing."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mrs.engine.batcher import ServerBusyError
from mrs.engine.models import ModelManager, resolve_name
from mrs.errors import InvalidModelNameError, ModelNotFoundError


class FakeLoader:
    """Loads instantly, or blocks a named model until released; counts loads and says when
    each model's load began (``entered``), so a test can wait for it instead of sleeping."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = collections.defaultdict(threading.Event)
        self.fail: set[str] = set()

    def __call__(self, path: Path, **_):
        name = path.name
        self.loads.append(name)
        self.entered[name].set()
        gate = self.gates.get(name)
        if gate is not None:
            assert gate.wait(10)
        if name in self.fail:
            raise RuntimeError(f"cannot load {name}")
        return SimpleNamespace(name=name, family=SimpleNamespace(kind="encoder"), context_length=512)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    for name in ("org--a", "org--b", "org--c"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (folder / "model.safetensors").write_bytes(b"")
    return tmp_path


def manager(home: Path, loader: FakeLoader, **kwargs) -> ModelManager:
    return ModelManager(home, loader=loader, warmup=False, **{"max_loaded": 2, **kwargs})


async def load_began(loader: FakeLoader, folder: str) -> None:
    """Wait (off the event loop, which must keep running the loads) until ``folder``'s load began.

    Every task created before this call has then run up to its first wait: the one that
    loads is inside the loader, the others wait on its load."""
    began = await asyncio.get_running_loop().run_in_executor(None, loader.entered[folder].wait, 10)
    assert began, f"the load of {folder} never began"


def test_names_resolve_inside_the_models_directory_only(home):
    assert resolve_name(home, "org/a:latest") == ("org/a", (home / "org--a").resolve())
    for bad in ("../org--a", "/etc", "org/a/../../x", "org--a", ".hidden"):
        with pytest.raises(InvalidModelNameError):
            resolve_name(home, bad)
    with pytest.raises(ModelNotFoundError):
        resolve_name(home, "org/missing")


def test_concurrent_requests_for_one_model_share_one_load(home):
    loader = FakeLoader()
    loader.gates["org--a"] = gate = threading.Event()

    async def main():
        m = manager(home, loader)
        first = asyncio.create_task(m.acquire("org/a"))
        second = asyncio.create_task(m.acquire("org/a"))
        await load_began(loader, "org--a")
        assert not second.done()  # it waits on the first one's load
        gate.set()
        (one, _), (two, _) = await asyncio.gather(first, second)
        assert one is two
        await m.close()

    asyncio.run(main())
    assert loader.loads == ["org--a"]


def test_loading_a_model_does_not_block_requests_for_a_loaded_one(home):
    loader = FakeLoader()

    async def main():
        m = manager(home, loader)
        await m.acquire("org/a")
        loader.gates["org--b"] = gate = threading.Event()
        slow = asyncio.create_task(m.acquire("org/b"))
        await load_began(loader, "org--b")
        # org/b's gate stays shut until below: were this acquire to wait on that load, it
        # would time out here.
        loaded, seconds = await asyncio.wait_for(m.acquire("org/a"), 5)
        assert loaded.name == "org/a" and seconds == 0
        assert not slow.done() and m.loading == 1
        gate.set()
        await slow
        assert m.loading == 0
        await m.close()

    asyncio.run(main())


def test_least_recently_used_idle_model_is_evicted(home):
    loader = FakeLoader()

    async def main():
        m = manager(home, loader)
        async with m.use("org/a"):
            pass
        async with m.use("org/b"):
            pass
        async with m.use("org/a"):  # a is now more recent than b
            pass
        async with m.use("org/c"):
            assert sorted(x.name for x in m.loaded()) == ["org/a", "org/c"]
        await m.close()

    asyncio.run(main())


def test_busy_models_are_never_evicted_and_a_full_house_is_503(home):
    loader = FakeLoader()

    async def main():
        m = manager(home, loader)
        async with m.use("org/a"), m.use("org/b"):
            with pytest.raises(ServerBusyError) as e:
                await m.acquire("org/c")
            assert e.value.http_status == 503 and e.value.retry_after >= 1
        await m.close()

    asyncio.run(main())


def test_keep_alive_zero_unloads_after_the_last_request_and_negative_keeps_forever(home):
    loader = FakeLoader()

    async def main():
        m = manager(home, loader)
        async with m.use("org/a", keep_alive=0):
            async with m.use("org/a", keep_alive=0):
                pass
            assert m.get_loaded("org/a") is not None  # still in use by the outer request
        assert m.get_loaded("org/a") is None
        async with m.use("org/b", keep_alive=-1):
            pass
        assert m.get_loaded("org/b").expires_at is None
        await m.close()

    asyncio.run(main())


def test_an_expired_keep_alive_unloads_the_model(home):
    loader = FakeLoader()

    async def main():
        m = manager(home, loader)
        m.start(interval=0.02)
        async with m.use("org/a", keep_alive=0.05) as (loaded, _):
            # Past its expiry by several reaper rounds, and still loaded: never while in use.
            while time.time() < loaded.expires_at + 5 * 0.02:
                await asyncio.sleep(0.02)
            assert m.get_loaded("org/a") is not None
        deadline = time.monotonic() + 5
        while m.get_loaded("org/a") is not None:
            assert time.monotonic() < deadline, "an expired keep_alive never unloaded the model"
            await asyncio.sleep(0.02)
        await m.close()

    asyncio.run(main())


def test_a_failed_load_reaches_every_waiter_and_the_next_request_retries(home):
    loader = FakeLoader()
    loader.fail.add("org--a")
    loader.gates["org--a"] = gate = threading.Event()

    async def main():
        m = manager(home, loader)
        tasks = [asyncio.create_task(m.acquire("org/a")) for _ in range(3)]
        await load_began(loader, "org--a")
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        loader.fail.clear()
        loaded, _ = await m.acquire("org/a")
        assert loaded.name == "org/a"
        await m.close()

    asyncio.run(main())
    assert loader.loads == ["org--a", "org--a"]


def test_operator_given_folders_outside_home_are_served_by_name(home, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "mine"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (outside / "model.safetensors").write_bytes(b"")
    loader = FakeLoader()

    async def main():
        m = manager(home, loader, extra={"mine": outside})
        assert m.resolve("mine:latest") == ("mine", outside)
        async with m.use("mine") as (loaded, _):
            assert loaded.path == outside
        with pytest.raises(ModelNotFoundError):
            m.resolve("theirs")
        await m.close()

    asyncio.run(main())
