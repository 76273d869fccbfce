"""Compiled steps persist across processes (mrs/backends/jax/executables.py): a second
process loads every step it compiled before, a change of shape, dtype or jax version misses
without harm, a damaged entry is rebuilt, and the CLI shows, reports and clears the cache.

Each check runs fresh processes: the store is per process, and a hit means another one
wrote it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import REPO, run_mrs

from mrs import compile_cache

CHILD = """
import json, sys
{before}
import mrs
from mrs.backends.jax import executables
model = mrs.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
done = mrs.generate(model, "Once upon a time", max_tokens=int(sys.argv[3]), temperature=0, ignore_eos=True)
print(json.dumps({{"ids": list(done.token_ids), "stats": dict(executables.STATS)}}))
"""


def child(model: Path, cache: Path, *, dtype: str = "float32", max_tokens: int = 6, before: str = "",
          env: dict | None = None) -> dict:
    """Load ``model`` and generate greedily in a fresh process; its tokens and store counters."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    full.update({"JAX_PLATFORMS": "cpu", "MRS_COMPILE_CACHE": str(cache), **(env or {})})
    done = subprocess.run([sys.executable, "-c", CHILD.format(before=before), str(model), dtype, str(max_tokens)],
                          capture_output=True, text=True, env=full, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("jax-*/steps/*/*.exe"))


@pytest.fixture(scope="module")
def llama(fixture_path) -> Path:
    return fixture_path("llama")


@pytest.fixture(scope="module")
def first(llama, tmp_path_factory) -> tuple[Path, dict]:
    """A cache one process filled (its prefill and decode), and what that process saw."""
    cache = tmp_path_factory.mktemp("compiled")
    return cache, child(llama, cache)


def test_a_second_process_loads_every_step_it_needs_from_the_cache(llama, first):
    cache, cold = first
    assert cold["stats"] == {"miss": 2, "stored": 2}          # prefill and decode, compiled once
    assert len(entries(cache)) == 2
    warm = child(llama, cache)
    assert warm["stats"] == {"hit": 2}
    assert warm["ids"] == cold["ids"]


def test_a_new_shape_dtype_or_jax_version_misses_and_still_runs(llama, first, tmp_path):
    cache, cold = first
    # A longer generation needs a bigger cache bucket: decode (and prefill, which writes
    # into it) are new shapes; the old entries stay.
    longer = child(llama, cache, max_tokens=300)
    assert longer["stats"].get("miss") == 2 and longer["ids"][:6] == cold["ids"]
    assert child(llama, cache, dtype="bfloat16")["stats"] == {"miss": 2, "stored": 2}
    # Another jax version keys its own folder, and reads nothing of this one's.
    other = tmp_path / "cache"
    child(llama, other)
    upgraded = child(llama, other, before="import jax; jax.__version__ = '0.0.1+test'")
    assert upgraded["stats"] == {"miss": 2, "stored": 2} and upgraded["ids"] == cold["ids"]
    assert sorted(p.name for p in other.iterdir()) == sorted(
        [f"jax-0.0.1+test-jaxlib-{_jaxlib()}", f"jax-{_jax()}-jaxlib-{_jaxlib()}"])


def test_a_damaged_entry_is_ignored_and_rebuilt(llama, first, tmp_path):
    _, cold = first
    cache = tmp_path / "cache"
    child(llama, cache)
    flipped, cut = entries(cache)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF                               # one bit flip in the payload
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1000])                   # a torn write
    repaired = child(llama, cache)
    assert repaired["stats"] == {"rejected": 2, "stored": 2} and repaired["ids"] == cold["ids"]
    assert child(llama, cache)["stats"] == {"hit": 2}


def test_an_entry_with_a_valid_checksum_but_no_executable_is_rebuilt(llama, first, tmp_path):
    import hashlib

    from mrs.backends.jax.executables import MAGIC

    cache = tmp_path / "cache"
    child(llama, cache)
    junk = b"not a pickle"
    for path in entries(cache):
        path.write_bytes(MAGIC + hashlib.sha256(junk).digest() + junk)
    assert child(llama, cache)["stats"] == {"rejected": 2, "stored": 2}


def test_a_step_from_jaxs_own_cache_is_run_but_never_stored(llama, first, tmp_path):
    """An executable JAX's persistent cache returns was deserialized; serialized again on CPU
    it loses its compiled functions and fails when run ("Function ... not found")."""
    _, cold = first
    cache, xla = tmp_path / "cache", tmp_path / "xla"
    env = {"JAX_COMPILATION_CACHE_DIR": str(xla), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    child(llama, cache, env=env)                               # both caches filled
    for path in entries(cache):
        path.unlink()
    from_xla = child(llama, cache, env=env)                    # compiled from JAX's cache
    assert from_xla["stats"] == {"miss": 2, "unstorable": 2} and not entries(cache)
    assert child(llama, cache, env=env)["ids"] == cold["ids"]


SERVER_CHILD = """
import json, sys, threading
import mrs
from mrs.backends.jax import executables
from mrs.engine.batcher import Batcher, Request
from mrs.sampling import SamplingParams
model = mrs.load(sys.argv[1], device="cpu")
batcher = Batcher(model, slots=2, max_len=256).start()
batcher.warmup()
preloaded = batcher.preload()
at_start = dict(executables.STATS)
done = threading.Event()
tokens = []
def sink(event):
    tokens.append(event.text)
    if event.done is not None:
        tokens.extend(event.done.token_ids)
    if event.done is not None or event.error is not None:
        done.set()
batcher.submit(Request(list(range(3, 43)), sink, SamplingParams.make(temperature=0, seed=0), max_tokens=3,
                       ignore_eos=True))                                  # 40 tokens: the 64 bucket
assert done.wait(120)
batcher.close()
print(json.dumps({"preloaded": preloaded, "at_start": at_start, "after": dict(executables.STATS),
                  "tokens": tokens}))
"""


def test_a_restarted_server_takes_its_prompt_buckets_from_the_cache(llama, tmp_path):
    """The batcher's preload (what the server runs at load) finds the buckets an earlier
    process compiled, and compiles none itself; the first request then compiles nothing."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    env.update(JAX_PLATFORMS="cpu", MRS_COMPILE_CACHE=str(cache))

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", SERVER_CHILD, str(llama)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["preloaded"] == []                   # only warm-up's bucket (16) existed, and it has that
    assert first["after"]["stored"] == 3              # warm-up's prefill and decode, then bucket 64
    second = run()
    assert second["preloaded"] == [64]
    assert second["at_start"] == {"hit": 3} and second["after"] == {"hit": 3}
    assert second["tokens"] == first["tokens"]


def test_a_process_that_exits_while_its_steps_prefetch_exits_cleanly(llama, first, tmp_path):
    """mrs.load starts loading cached steps on a thread; a process that ends right after the
    load (a chat's /exit, a script) must not abort in XLA at shutdown (it did, with -6)."""
    cache, _ = first
    child(llama, cache, max_tokens=300)          # more entries in the group than one run needs
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    env.update(JAX_PLATFORMS="cpu", MRS_COMPILE_CACHE=str(cache))
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", "import sys, mrs; mrs.load(sys.argv[1], device='cpu')",
                               str(llama)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]


def test_with_the_cache_off_nothing_is_written(llama, tmp_path):
    cache = tmp_path / "cache"
    done = child(llama, cache, env={"MRS_COMPILE_CACHE": "off"})
    assert done["stats"] == {} and not cache.exists()


def test_the_cli_says_when_it_compiles_and_shows_and_clears_the_cache(llama, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mine.txt").write_text("a user's file in the folder they chose")
    env = {"MRS_COMPILE_CACHE": str(cache)}
    args = ("generate", "Once upon a time", "--model", str(llama), "--max-tokens", "4", "--temperature", "0")
    cold = run_mrs(*args, env=env)
    assert cold.returncode == 0, cold.stderr
    assert "compiling prefill of 1 prompt of 32 tokens for this model and shape, once" in cold.stderr
    assert "compiling decode of 1 row" in cold.stderr
    warm = run_mrs(*args, env=env)
    assert warm.returncode == 0 and "compiling" not in warm.stderr and warm.stdout == cold.stdout

    shown = run_mrs("config", "cache", env=env)
    assert shown.returncode == 0, shown.stderr
    assert str(cache) in shown.stdout and f"jax-{_jax()}-jaxlib-{_jaxlib()}" in shown.stdout
    assert " 2 " in shown.stdout                                # the two steps' files
    cleared = run_mrs("config", "clear-cache", env=env)
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    assert [p.name for p in cache.iterdir()] == ["mine.txt"]   # only what mrs wrote is gone
    assert "(empty" in run_mrs("config", "cache", env=env).stdout
    off = run_mrs("config", "cache", env={"MRS_COMPILE_CACHE": "off"})
    assert "off" in off.stdout


def test_help_list_show_and_config_cache_never_import_jax(llama, tmp_path):
    code = ("import sys\nfrom mrs.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('JAX-LOADED' if any(m.split('.')[0] in ('jax', 'jaxlib', 'flax') for m in sys.modules) "
            "else 'NO-JAX', file=sys.stderr)\n")
    env = {**os.environ, "MRS_COMPILE_CACHE": str(tmp_path / "cache"), "MRS_HOME": str(tmp_path / "models"),
           "PAGER": "cat"}
    for args in (["--help"], ["list"], ["show", str(llama)], ["config", "cache"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120, check=False)
        assert done.stderr.strip().endswith("NO-JAX"), (args, done.stderr[-2000:])


def test_clear_leaves_a_folder_without_our_entries_alone(tmp_path):
    (tmp_path / "jaxfile").write_text("not a version folder")
    (tmp_path / "notes").mkdir()
    assert compile_cache.clear(tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jaxfile", "notes"]
    assert compile_cache.root("off") is None and compile_cache.root("") == compile_cache.default_root()


def _jax() -> str:
    import jax

    return jax.__version__


def _jaxlib() -> str:
    from mrs.backends.jax.executables import _jaxlib_version

    return _jaxlib_version()
