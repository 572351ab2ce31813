"""Package hygiene: one-way imports, curated exports, docstring examples."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import privgrad.accounting as accounting

PACKAGE_DIR = Path(accounting.__file__).parent
MODULES = sorted(
    f"privgrad.accounting.{info.name}" for info in pkgutil.iter_modules([str(PACKAGE_DIR)])
)


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_imports_nothing_else_from_privgrad(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
            assert node.level == 0, f"{path.name}: use absolute imports"
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "privgrad" or name.startswith("privgrad."):
                assert name.startswith("privgrad.accounting"), f"{path.name} imports {name}"


def test_all_is_curated_and_resolvable() -> None:
    assert len(set(accounting.__all__)) == len(accounting.__all__)
    for name in accounting.__all__:
        assert getattr(accounting, name) is not None


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
