"""The package's import graph: no circles, and nothing above the backend seam imports an
array library (mrs/backends: the engine, server and CLI see numpy and the protocol)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mrs"
# Below the seam: each backend's array code. Every other module is above it.
JAX_SIDE = ("mrs.backends.jax", "mrs.archs", "mrs.cache", "mrs.kernels")
MLX_SIDE = ("mrs.backends.mlx", "mrs.mlx")
BELOW_SEAM = JAX_SIDE + MLX_SIDE
ARRAY_LIBRARIES = ("jax", "jaxlib", "flax", "mlx", "torch")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # `from mrs import store`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def below(name: str, side: tuple[str, ...] = BELOW_SEAM) -> bool:
    return any(name == b or name.startswith(b + ".") for b in side)


def test_the_package_has_no_import_circle():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            # A package imports its own submodules; a submodule importing its parent is that same edge.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_module_above_the_seam_imports_an_array_library_or_the_code_below_it():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if below(name):
            continue
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in ARRAY_LIBRARIES or below(imported):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_the_backends_stand_apart_mlx_code_never_imports_jax_and_jax_code_never_imports_mlx():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for side, other, foreign in ((MLX_SIDE, JAX_SIDE, ("jax", "jaxlib", "flax")), (JAX_SIDE, MLX_SIDE, ("mlx",))):
            if below(name, side):
                offenders += [f"{name} imports {m}" for m in imports_of(path)
                              if m.split(".")[0] in foreign or below(m, other)]
    assert not offenders, offenders


def test_the_seam_holds_at_run_time_the_cli_server_and_engine_import_without_jax():
    code = ("import sys; import mrs, mrs.cli, mrs.server.app, mrs.engine.batcher, mrs.engine.session, "
            "mrs.embedding, mrs.model, mrs.chat; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')); "
            "print(loaded); sys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_import_checks_see_a_circle_and_a_jax_import(tmp_path, monkeypatch):
    """The checks above can fail: on a package with a lazy circle and a jax import they do."""
    fake = tmp_path / "mrs"
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "a.py").write_text("from mrs import b\n")
    (fake / "b.py").write_text("def f():\n    from mrs.a import x\n")
    (fake / "engine" / "loop.py").write_text("import jax.numpy as jnp\n")
    (fake / "mlx").mkdir()
    (fake / "mlx" / "__init__.py").write_text("")
    (fake / "mlx" / "llama.py").write_text("def f():\n    from mrs.archs.layers import Linear\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_the_package_has_no_import_circle()
    except AssertionError as e:
        assert "mrs.a" in str(e) and "mrs.b" in str(e)
    else:
        raise AssertionError("a circle went unseen")
    try:
        test_no_module_above_the_seam_imports_an_array_library_or_the_code_below_it()
    except AssertionError as e:
        assert "mrs.engine.loop imports jax.numpy" in str(e)
    else:
        raise AssertionError("a jax import above the seam went unseen")
    try:
        test_the_backends_stand_apart_mlx_code_never_imports_jax_and_jax_code_never_imports_mlx()
    except AssertionError as e:
        assert "mrs.mlx.llama imports mrs.archs.layers" in str(e)
    else:
        raise AssertionError("MLX code importing the JAX layers went unseen")
