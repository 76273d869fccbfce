"""Shared pytest setup: CPU JAX, no Hub access, and the transformers-built model fixtures.

`fixtures_dir` is `<repo>/.fixtures`, rebuilt by scripts/make_fixtures.py whenever its
stamp is stale (first run on a fresh clone: ~20 s of CPU), so plain `pytest` just works.
Tests that take a `fixture_name` or `decoder_name` argument run once per fixture.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Never read the machine's own Ollama store: tests that need one build it and point here.
os.environ.setdefault("OLLAMA_MODELS", "/nonexistent/mrs-tests/ollama")
# XLA's CPU backend spends most of a test's time compiling tiny models; its LLVM
# optimisation level barely matters for their speed but halves compile time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# The compile cache is off for the suite's own processes (tests/test_compile_cache.py gives
# its children a folder of their own): serializing an executable once segfaulted inside
# XLA in this long-lived process, after some 340 tests had compiled hundreds of programs
# (test_phi's decode; not reproduced alone). Never the user's folder either way.
os.environ.setdefault("MRS_COMPILE_CACHE", "off")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The torch-free stage (scripts/test312.sh, newest jax) has no oracle for these modules,
# which check mrs against transformers' own code at import.
ORACLES = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
collect_ignore = [] if ORACLES else ["test_sampling.py"]


def load_script(stem: str):
    """Import scripts/<stem>.py by path (scripts/ is not a package), once per session."""
    name = f"mrs_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


make_fixtures = load_script("make_fixtures")   # cheap: no torch


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `fixture_name` over every fixture and `decoder_name` over the decoders."""
    if "fixture_name" in metafunc.fixturenames:
        metafunc.parametrize("fixture_name", list(make_fixtures.FIXTURES))
    if "decoder_name" in metafunc.fixturenames:
        metafunc.parametrize("decoder_name", list(make_fixtures.SPECS))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The built fixtures folder; (re)built here when its stamp does not match the script."""
    out = make_fixtures.DEFAULT_OUT
    if not make_fixtures.is_current(out):
        with make_fixtures.locked(out):  # concurrent sessions/workers: one builds, others wait
            if not make_fixtures.is_current(out):
                make_fixtures.build_all(out)
    return out


@pytest.fixture(scope="session")
def fixture_path(fixtures_dir: Path) -> Callable[[str], Path]:
    """`fixture_path("llama")` -> the folder of that fixture."""

    def path(name: str) -> Path:
        if name not in make_fixtures.FIXTURES:
            raise KeyError(f"no fixture {name!r}; known: {sorted(make_fixtures.FIXTURES)}")
        return fixtures_dir / name

    return path
