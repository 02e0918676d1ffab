"""The package layout's import rules: the runtime never imports the dev tooling (the tooling
imports the runtime, never the CLI), and the config types load no heavy library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
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
