"""The package's shape: one import name, no import circles, a pure domain core, a light client.

The import graph is read from the sources with ``ast``: every import counts, also those inside
functions and under ``TYPE_CHECKING`` (a circle hidden that way is still a circle of ideas).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"nextbest": ROOT / "server", "nextbest.bandit": ROOT / "bandit"}
GENERATED = "nextbest.v1"
ADAPTERS = ("grpc", "sqlalchemy", "psycopg", "alembic", "google.protobuf")
HEAVY = ("sqlalchemy", "alembic", "vowpalwabbit", "pylibvw", "matplotlib")


def _modules() -> dict[str, Path]:
    """Every module of the package by its import name (bandit/ is nextbest.bandit, not nextbest's server/bandit)."""
    out: dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *rel)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts as a.b when b is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not t.startswith(GENERATED):
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items() if not m.startswith(GENERATED)}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles_among_the_projects_modules() -> None:
    assert _circles(_graph()) == []


def test_the_circle_check_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nextbest.b import X\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from nextbest import a\n")
    modules = {"nextbest.a": a, "nextbest.b": b}
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _circles(graph) == [["nextbest.a", "nextbest.b"]]


def test_nothing_imports_the_old_top_level_names() -> None:
    offenders = []
    for path in [*ROOT.joinpath("server").rglob("*.py"), *ROOT.joinpath("bandit").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("server", "bandit", "scripts")]
    assert offenders == []


def test_the_package_list_names_every_folder() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    folders = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert listed == folders


def test_bandit_sources_import_no_adapter_and_nothing_of_the_server() -> None:
    offenders = []
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("nextbest.bandit"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{name}: {n}" for n in names if n.startswith(ADAPTERS)]
        offenders += [f"{name}: {m}" for m in _imports(name, path, modules) if not m.startswith("nextbest.bandit")]
    assert offenders == []


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_importing_every_bandit_module_loads_no_adapter() -> None:
    modules = sorted(m for m in _modules() if m.startswith("nextbest.bandit"))
    loaded = _loaded_after(f"import importlib\nfor m in {modules!r}: importlib.import_module(m)")
    assert [m for m in loaded if m in ("grpc", "sqlalchemy", "psycopg", "alembic", "google")] == []


def test_the_client_loads_no_server_dependency() -> None:
    loaded = _loaded_after("from nextbest import NextbestClient\nNextbestClient")
    assert "grpc" in loaded  # the probe saw the client's own transport
    assert [m for m in loaded if m in HEAVY] == []
