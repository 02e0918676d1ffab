"""The package layout's rules: the runtime never imports the dev tooling (the tooling imports
the runtime, never the CLI), the config types and the ground floor load no heavy library, no
import cycle, no module over 700 lines."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Set
from pathlib import Path

import pytest

import lipsync_ray

PACKAGE = Path(lipsync_ray.__file__).parent
DEV = PACKAGE / "dev"  # the tooling; every other module of the package, at any depth, runs
RUNTIME = sorted(p for p in PACKAGE.rglob("*.py") if DEV not in p.parents)
TOOLING = sorted(DEV.rglob("*.py"))
# The CLI fronts the tooling commands (demo, models, bench, reference): it may import
# lipsync_ray.dev inside those commands' functions (_cmd_*), nowhere else.
FRONTS_TOOLING = {"cli.py"}
HEAVY = ("cv2", "av", "pyarrow", "onnx", "onnxruntime", "ray")


def _imported(node: ast.AST, module: str) -> list[str]:
    """Absolute names an Import/ImportFrom node of ``module`` (a lipsync_ray submodule) names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against the package
        parts = module.split(".")[: -node.level]
        base = ".".join([*parts, base] if base else parts)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _names(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _names_dev(name: str) -> bool:
    return _names(name, "lipsync_ray.dev")


def _module(path: Path) -> str:
    """The dotted name of the module at ``path`` (``lipsync_ray.workdir.__init__`` for a
    package: relative imports resolve against it); a file outside the package is taken for a
    top-level module of it."""
    try:
        parts = path.relative_to(PACKAGE).with_suffix("").parts
    except ValueError:
        parts = (path.stem,)
    return ".".join(("lipsync_ray", *parts))


def _module_name(path: Path) -> str:
    """``lipsync_ray/inference/session.py`` -> ``lipsync_ray.inference.session`` (a package's
    ``__init__.py`` is the package)."""
    return _module(path).removesuffix(".__init__")


def _every_function(node: ast.AST) -> bool:
    return True


def _is_command(node: ast.AST) -> bool:
    """A CLI command's function: ``_cmd_render``..."""
    return getattr(node, "name", "").startswith("_cmd_")


def _outside_functions(node: ast.AST, exempt: Callable[[ast.AST], bool] = _every_function):
    """``node`` and everything below it but the bodies of the functions ``exempt`` accepts
    (by default every function: what is left runs on import)."""
    yield node
    for child in ast.iter_child_nodes(node):
        is_function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if not (is_function and exempt(child)):
            yield from _outside_functions(child, exempt)


def _imports_of(
    path: Path,
    package: str = "lipsync_ray.dev",
    *,
    exempt: Callable[[ast.AST], bool] | None = None,
    module: str | None = None,
) -> list[str]:
    """``FILE:LINE: NAME`` of every import in ``path`` (the module ``module``; default: the
    one at that path) that names ``package`` or a module in it, but in the bodies of the
    functions ``exempt`` accepts."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module or _module(path)
    nodes = ast.walk(tree) if exempt is None else _outside_functions(tree, exempt)
    return [
        f"{path.name}:{node.lineno}: {name}"
        for node in nodes
        for name in _imported(node, module)
        if _names(name, package)
    ]


def _dev_imports(path: Path, *, module_level_only: bool) -> list[str]:
    """``FILE:LINE: NAME`` of every import in ``path`` that names lipsync_ray.dev."""
    return _imports_of(path, exempt=_every_function if module_level_only else None)


def test_runtime_modules_are_found() -> None:
    names = {_module(p) for p in RUNTIME}
    assert {"pipeline", "config", "precision", "cli", "flags", "workdir.layout"} <= {
        n.removeprefix("lipsync_ray.") for n in names
    }
    assert not [n for n in names if _names_dev(n)]
    assert {"lipsync_ray.dev.bench", "lipsync_ray.dev.models"} <= {_module(p) for p in TOOLING}


def _id(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", RUNTIME, ids=_id)
def test_runtime_never_imports_dev_tooling(path: Path) -> None:
    exempt = _is_command if path.name in FRONTS_TOOLING else None
    assert _imports_of(path, exempt=exempt) == []


def test_the_check_sees_dev_imports(tmp_path: Path) -> None:
    """The checker itself: every spelling of an import of the tooling is caught."""
    spellings = [
        "import lipsync_ray.dev.models",
        "from lipsync_ray.dev.models import save_model",
        "from lipsync_ray.dev import synthetic",
        "from lipsync_ray import dev",
        "from .dev import bench",
        "from .dev.speech import write_audio",
        "if True:\n    from lipsync_ray.dev import demo",
    ]
    for source in spellings:
        path = tmp_path / "mod.py"
        path.write_text(source + "\n")
        assert _dev_imports(path, module_level_only=False), source
        assert _dev_imports(path, module_level_only=True), source
    path.write_text("def f():\n    from lipsync_ray.dev.models import build_model\n")
    assert _dev_imports(path, module_level_only=False)
    assert not _dev_imports(path, module_level_only=True)
    assert _imports_of(path, exempt=_is_command)  # the CLI: in a command's function only
    path.write_text("def _cmd_f(args):\n    from lipsync_ray.dev.models import build_model\n")
    assert not _imports_of(path, exempt=_is_command)


@pytest.mark.parametrize("path", TOOLING, ids=_id)
def test_tooling_never_imports_the_cli(path: Path) -> None:
    """The tooling runs the CLI as a process and takes the flags from lipsync_ray.flags; an
    import of lipsync_ray.cli, even inside a function, would tie dev to the command line."""
    assert _imports_of(path, "lipsync_ray.cli") == []


@pytest.mark.parametrize(
    "source",
    [
        "import lipsync_ray.cli",
        "from lipsync_ray.cli import render_argv",
        "from lipsync_ray import cli",
        "from .. import cli",
        "from ..cli import main",
        "def f():\n    from lipsync_ray.cli import main",
    ],
)
def test_the_check_sees_cli_imports_in_the_tooling(source: str, tmp_path: Path) -> None:
    """Every spelling, relative ones resolved as in a module of lipsync_ray/dev/."""
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    assert _imports_of(path, "lipsync_ray.cli", module="lipsync_ray.dev.mod"), source
    path.write_text(source.replace("cli", "client") + "\n")  # only starts like it: not it
    assert not _imports_of(path, "lipsync_ray.cli", module="lipsync_ray.dev.mod")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_config_types_load_no_heavy_library() -> None:
    loaded = _loaded_after("from lipsync_ray import RenderConfig, PoolConfig")
    assert [m for m in HEAVY if m in loaded] == []
    assert not [m for m in loaded if _names_dev(m)]


def test_importing_the_runtime_loads_no_dev_tooling() -> None:
    modules = [_module(p).removesuffix(".__init__") for p in RUNTIME]
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= set(loaded)
    assert [m for m in loaded if _names_dev(m)] == []


# The ground floor: plain values every layer names (chunk wire types, options, the config, the
# models' contract, the errors). The driver-only parts import them without the actors' stack.
GROUND_FLOOR = (
    "lipsync_ray.chunks",
    "lipsync_ray.options",
    "lipsync_ray.config",
    "lipsync_ray.contract",
    "lipsync_ray.errors",
)
NOT_ON_THE_GROUND_FLOOR = ("ray", "pyarrow", "onnxruntime", "cv2")


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_the_ground_floor_loads_no_heavy_library(module: str) -> None:
    """Each ground-floor module alone, in a fresh interpreter: not even transitively."""
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert [m for m in NOT_ON_THE_GROUND_FLOOR if m in loaded] == []


def test_the_ground_floor_probe_sees_heavy_libraries() -> None:
    """The probe itself: a module with OpenCV at module level is caught."""
    assert "cv2" in _loaded_after("import lipsync_ray.composite")


# --------------------------------------------------------------------------- import graph


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, never executed."""
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _executed(node: ast.AST):
    """``node`` and everything below it that can run: function bodies included (an import
    inside a function is an edge too), ``if TYPE_CHECKING:`` blocks excluded."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not _is_type_checking(child):
            yield from _executed(child)


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def _import_graph() -> dict[str, frozenset[str]]:
    """Module -> the package modules it imports, at module level or inside functions.

    ``from lipsync_ray.x import y`` is an edge to ``lipsync_ray.x.y`` when that is a module,
    else to ``lipsync_ray.x``. A submodule's implicit import of its parent package is not an
    edge (every package would be a cycle with its own modules)."""
    modules = _package_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in _executed(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    edges.add(sub if (sub := f"{base}.{alias.name}") in modules else base)
        graph[module] = frozenset(m for m in edges if m in modules and m != module)
    return graph


def _cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# Import edges that still close a cycle, each with its reason. The test fails on any other
# cycle, and on an entry here that no longer exists (delete it).
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def test_the_import_graph_sees_function_level_and_relative_imports() -> None:
    graph = _import_graph()
    assert "lipsync_ray.dev.bench" in graph["lipsync_ray.cli"]  # inside a function
    assert "lipsync_ray.inference.session" in graph["lipsync_ray.inference"]
    assert "lipsync_ray.chunks" in graph["lipsync_ray.workdir.directory"]
    # TYPE_CHECKING-only: chunks names WorkStore in annotations, never imports it.
    assert "lipsync_ray.workdir.remote" not in graph["lipsync_ray.chunks"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle() -> None:
    graph = {module: set(edges) for module, edges in _import_graph().items()}
    for source, target in KNOWN_CYCLE_EDGES:
        assert target in graph[source], f"{source} -> {target} is gone: drop it from the list"
        graph[source].discard(target)
    assert _cycles(graph) == []


# --------------------------------------------------------------------------- module size

MAX_MODULE_LINES = 700
# Modules allowed over the limit, each with its reason.
OVERSIZED = {
    "lipsync_ray/encode.py": "probe, segments, join and AAC in one module; its split is pending",
}


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_is_over_700_lines(path: Path) -> None:
    name = str(path.relative_to(PACKAGE.parent))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES or name in OVERSIZED, f"{name}: {lines} lines"
