"""The package's shape: no import cycles (type-only and function-level
imports included), one module that claims event ids, and a small public
surface, every name of which docs/api.rst documents.
"""

from __future__ import annotations

import ast
import re
import typing as t
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flask_ploints"
#: The most names the public modules (no part of their path starts with an
#: underscore) may export in their ``__all__``.
MAX_PUBLIC_NAMES = 60
API_DOCS = PACKAGE.parent / "docs" / "api.rst"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of the package's own modules, wherever the
    import statement stands.
    """
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # "from . import signals" imports a module; "from .x import y"
                # imports x (and y, when y is a module).
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # A module's own packages are imported before it anyway.
                if target and not (name == target or name.startswith(target + ".")):
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            found = visit(target, [*path, name])
            if found is not None:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name, [])
        if found is not None:
            return found
    return None


def test_the_import_graph_is_read() -> None:
    graph = _imports(_modules())
    assert "flask_ploints._state" in graph["flask_ploints._views"] or (
        "flask_ploints._processing" in graph["flask_ploints._views"]
    )
    assert graph["flask_ploints._errors"] == set()
    # Type-only and function-level imports count.
    assert "flask_ploints.delivery_log._configure" in graph["flask_ploints._extension"]
    assert "flask_ploints._celery" in graph["flask_ploints._extension"]


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    assert _cycle(_imports(_modules())) is None


@pytest.mark.parametrize(
    "lower",
    [
        "flask_ploints._errors",
        "flask_ploints._events",
        "flask_ploints.stores",
        "flask_ploints._dispatch",
        "flask_ploints._processing",
        "flask_ploints._state",
        "flask_ploints._views",
        "flask_ploints._celery",
        "flask_ploints.replay",
        "flask_ploints.delivery_log",
        "flask_ploints._cli",
        "flask_ploints.testing",
    ],
)
def test_nothing_below_the_extension_imports_it(lower: str) -> None:
    graph = _imports(_modules())
    below = [name for name in graph if name == lower or name.startswith(lower + ".")]
    assert below
    for name in below:
        assert "flask_ploints._extension" not in graph[name], name


def test_one_module_claims_event_ids() -> None:
    callers = set()
    for name, path in _modules().items():
        if name.startswith("flask_ploints.stores") or name == "flask_ploints.testing":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "claim"
            ):
                callers.add(name)
    assert callers == {"flask_ploints._processing"}


def _public_names() -> dict[str, list[str]]:
    names = {}
    for name, path in _modules().items():
        if any(part.startswith("_") for part in name.split(".")):
            continue
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and [getattr(target, "id", None) for target in node.targets] == ["__all__"]
                and isinstance(node.value, ast.List)
            ):
                names[name] = [t.cast("ast.Constant", item).value for item in node.value.elts]
    return names


def test_the_public_surface_is_small() -> None:
    names = _public_names()
    assert set(names) >= {"flask_ploints", "flask_ploints.stores", "flask_ploints.testing"}
    assert sum(len(exported) for exported in names.values()) <= MAX_PUBLIC_NAMES


def test_every_public_name_is_documented() -> None:
    text = API_DOCS.read_text()
    documented = set(re.findall(r"\.\. (?:auto)?\w+:: ([\w.]+)", text))
    current = ""
    for line in text.splitlines():
        module = re.match(r"\.\. (?:auto)?module:: ([\w.]+)", line)
        if module:
            current = module[1]
        member = re.match(r"\.\. auto\w+:: (\w+)$", line)
        if member and current:
            documented.add(f"{current}.{member[1]}")
    missing = [
        f"{module}.{name}"
        for module, exported in _public_names().items()
        for name in exported
        if f"{module}.{name}" not in documented
    ]
    assert missing == []


def test_private_modules_are_not_documented_as_api() -> None:
    assert re.findall(r"\.\. auto\w+:: (\S*\._\w+)", API_DOCS.read_text()) == []


@pytest.mark.parametrize(
    "bench", sorted(PACKAGE.parent.glob("bench/*.py")), ids=lambda path: path.name
)
def test_the_benches_import_what_exists(bench: Path) -> None:
    # The benches run by hand, not in the suite: a module moved or renamed
    # breaks them unseen.
    import importlib

    missing = []
    for node in ast.walk(ast.parse(bench.read_text(), str(bench))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flask_ploints"):
            module = importlib.import_module(t.cast(str, node.module))
            missing += [
                f"{node.module}.{alias.name}"
                for alias in node.names
                if not hasattr(module, alias.name)
            ]
    assert missing == []
