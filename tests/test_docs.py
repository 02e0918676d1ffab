"""The documents cite code that exists: every file path, dotted name and code identifier in
backticks in ``README.md`` and ``docs/*.md`` is looked up in the repository.

- paths (``lipsync_ray/workdir/layout.py``, ``scripts/blend_figure.py``, ``lipsync_ray/dev/``):
  the file or directory exists;
- dotted names whose first part is a module of the package or a class or function it defines
  (``lipsync_ray.inference.wrapper``, ``workdir.layout.REPORT``, ``Manifest.complete``,
  ``SessionOptions.graph_io``): imported and looked up attribute by attribute (a dataclass
  field or an attribute a class sets on ``self`` counts). Dotted names of other libraries
  (``np.float32``, ``ray.put``) and file names (``report.json``) are not checked;
- bare identifiers that can only be code (``snake_case`` with an underscore, ``CamelCase``):
  the word occurs in the package's, the jobs' or the scripts' source.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lipsync_ray"
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SOURCES = sorted(
    [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "jobs").glob("*.py"),
        *(ROOT / "scripts").glob("*"),
        ROOT / "pyproject.toml",  # the dependencies the documents name
    ]
)
# Roots of repository paths the documents cite.
PATH_ROOTS = ("lipsync_ray/", "tests/", "scripts/", "jobs/", "docs/", "notebooks/", ".ci/")
# Last parts of dotted names that are file names, not attributes.
FILE_SUFFIXES = {
    "json", "mp4", "wav", "mp3", "m4a", "flac", "aac", "py", "npy", "parquet", "onnx", "md",
    "png", "jpg", "yaml", "yml", "toml", "txt", "so", "lock", "plan", "data", "tmp", "sh",
    "ipynb", "mkv", "mov", "cfg", "gz",
}  # fmt: skip

_BACKTICKED = re.compile(r"`([^`\n]+)`")
_PACKAGE_MENTION = re.compile(r"\blipsync_ray(?:/[\w./-]*|\.[\w.]*\w)")  # in backticks or not
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})+(\(\))?$")
_CODE_WORD = re.compile(
    r"^(_?[a-z][a-z0-9]*(_[a-z0-9]+)+|_[a-z][a-z0-9]*|[A-Z][a-z0-9]+([A-Z][a-z0-9]*)+)$"
)


def _cited(predicate) -> list[tuple[str, str]]:
    """(document, text) for every backticked span, and every mention of the package's paths and
    modules in plain text, that the predicate accepts."""
    found = []
    for doc in DOCUMENTS:
        source = doc.read_text()
        for text in [*_BACKTICKED.findall(source), *_PACKAGE_MENTION.findall(source)]:
            text = text.strip()
            if predicate(text):
                found.append((doc.name, text))
    return sorted(set(found))


def _is_path(text: str) -> bool:
    return text.startswith(PATH_ROOTS) and " " not in text


def _repo_path(text: str) -> Path:
    """The path part of a citation (``docs/model-and-audio.md §3.2`` -> the file)."""
    path = text.split()[0].rstrip(":,;")
    return ROOT / path.split("::")[0].split("#")[0]


@cache
def _package_modules() -> dict[str, str]:
    """Every module of the package by dotted name, also without the package's own name
    (``lipsync_ray.workdir.layout`` and ``workdir.layout``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = name
        if "." in name:
            modules[name.split(".", 1)[1]] = name
    return modules


@cache
def _string_constants() -> frozenset[str]:
    """Every string (and bytes) literal of the package: a dotted name among them is a key the
    code writes (``lipsync_ray.fingerprint`` in a shard's metadata), not an attribute."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                value = node.value
                found.add(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return frozenset(found)


@cache
def _definitions() -> dict[str, str]:
    """Top-level classes and functions of the package: name -> the module defining it."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                found.setdefault(node.name, module)
    return found


def _has_attribute(owner: object, name: str) -> bool:
    if hasattr(owner, name):
        return True
    if not inspect.isclass(owner):
        return False
    if dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
        return True
    try:
        source = inspect.getsource(owner)
    except (OSError, TypeError):
        return False
    # An attribute set in a method (``self.providers = ...``, ``self.a, self.b = ...``) or
    # declared in the class body (``name: type``).
    return re.search(rf"self\.{name}\b[^=\n]*=|^\s+{name}\s*:", source, re.MULTILINE) is not None


def _resolve(dotted: str) -> str | None:
    """None when ``dotted`` names something that exists, else what is missing."""
    parts = dotted.removesuffix("()").split(".")
    modules, definitions = _package_modules(), _definitions()
    # The longest prefix that is a module of the package, else a class or function it defines.
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            owner, rest = importlib.import_module(modules[prefix]), parts[i:]
            break
    else:
        if parts[0] not in definitions:
            return None  # another library's name
        module = importlib.import_module(definitions[parts[0]])
        owner, rest = getattr(module, parts[0]), parts[1:]
    for name in rest:
        if not _has_attribute(owner, name):
            return f"{dotted}: no {name!r} in {getattr(owner, '__name__', owner)!r}"
        owner = getattr(owner, name, None)
    return None


def _is_dotted_code(text: str) -> bool:
    if not _DOTTED.match(text) or text in _string_constants():
        return False
    last = text.removesuffix("()").rsplit(".", 1)[1]
    return last.lower() not in FILE_SUFFIXES


@cache
def _source_words() -> frozenset[str]:
    words: set[str] = set()
    for path in SOURCES:
        if path.is_file():
            words.update(re.findall(_IDENT, path.read_text(errors="replace")))
    return frozenset(words)


PATHS = _cited(_is_path)
DOTTED = _cited(_is_dotted_code)
WORDS = _cited(lambda text: _CODE_WORD.match(text) is not None)


def test_the_documents_cite_code() -> None:
    """The scan finds what it should (a scan that finds nothing would pass anything)."""
    assert len(DOCUMENTS) >= 7
    assert ("architecture.md", "lipsync_ray/pipeline.py") in PATHS
    assert any(text == "GeneratorSession.predict" for _, text in DOTTED)
    assert len(WORDS) > 100


@pytest.mark.parametrize(("document", "path"), PATHS, ids=[f"{d}:{p}" for d, p in PATHS])
def test_cited_paths_exist(document: str, path: str) -> None:
    cited = _repo_path(path)
    found = any(ROOT.glob(str(cited.relative_to(ROOT)))) if "*" in path else cited.exists()
    assert found, f"{document} cites {path}, which does not exist"


@pytest.mark.parametrize(("document", "name"), DOTTED, ids=[f"{d}:{n}" for d, n in DOTTED])
def test_cited_dotted_names_exist(document: str, name: str) -> None:
    missing = _resolve(name)
    assert missing is None, f"{document} cites {missing}"


def test_cited_code_words_occur_in_the_source() -> None:
    """One test for all bare identifiers, listing every one that is gone."""
    words = _source_words()
    missing = [f"{doc}: {text}" for doc, text in WORDS if text not in words]
    assert missing == []


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("workdir.open_manifest", True),  # a module of the package, no such function
        ("inference._generator_io", True),
        ("Renderer._no_such_method", True),  # a class the package defines
        ("lipsync_ray.workdir.layout.REPORT", False),
        ("workdir.layout.REPORT", False),
        ("SessionOptions.graph_io", False),  # a dataclass field
        ("GeneratorSession.fixed_batch", False),  # set on self in __init__
        ("ChunkSpec.feature_rows", False),  # a field without a default
        ("np.float32", False),  # another library: not checked
        ("manifest.record", False),  # a variable: only modules relative to the package count
    ],
)
def test_the_resolver_tells_present_from_gone(text: str, missing: bool) -> None:
    assert (_resolve(text) is not None) is missing
