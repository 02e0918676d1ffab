"""The package layout's import rules: the runtime never imports the dev tooling, and the config
types load no heavy library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lipsync_ray

PACKAGE = Path(lipsync_ray.__file__).parent
# lipsync_ray/dev/ is the tooling; everything else (subpackages included) runs
RUNTIME = sorted(p for p in PACKAGE.rglob("*.py") if "dev" not in p.relative_to(PACKAGE).parts)
# The CLI fronts the tooling commands (demo, models, bench, reference): it may import
# lipsync_ray.dev inside those commands' functions, never at module level.
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


def _module_name(path: Path) -> str:
    """``lipsync_ray/inference/session.py`` -> ``lipsync_ray.inference.session`` (a package's
    ``__init__.py`` is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _names_dev(name: str) -> bool:
    return name == "lipsync_ray.dev" or name.startswith("lipsync_ray.dev.")


def _outside_functions(node: ast.AST):
    """``node`` and everything below it that runs on import (function bodies do not)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _outside_functions(child)


def _dev_imports(path: Path, *, module_level_only: bool) -> list[str]:
    """``FILE:LINE: NAME`` of every import in ``path`` that names lipsync_ray.dev."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path) if path.is_relative_to(PACKAGE) else f"lipsync_ray.{path.stem}"
    nodes = _outside_functions(tree) if module_level_only else ast.walk(tree)
    return [
        f"{path.name}:{node.lineno}: {name}"
        for node in nodes
        for name in _imported(node, module)
        if _names_dev(name)
    ]


def test_runtime_modules_are_found() -> None:
    names = {p.name for p in RUNTIME}
    assert {"pipeline.py", "config.py", "precision.py", "cli.py"} <= names
    assert not names & {"models.py", "synthetic.py", "bench.py", "demo.py"}


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_never_imports_dev_tooling(path: Path) -> None:
    module_level_only = path.name in FRONTS_TOOLING
    assert _dev_imports(path, module_level_only=module_level_only) == []


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
    modules = [_module_name(p) for p in RUNTIME if p != PACKAGE / "__init__.py"]
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
    """The probe itself: a module with Ray and OpenCV at module level is caught."""
    loaded = _loaded_after("import lipsync_ray.actors")
    assert {"ray", "cv2"} <= {m for m in NOT_ON_THE_GROUND_FLOOR if m in loaded}
