"""The package's layout: the import-linter contracts in pyproject.toml hold (each subpackage imports
only from those below it, siblings are independent, only the CLI imports click and rich), no module
hides an import of the package inside a function, and the README's layout table is the packages'
own docstrings."""

import ast
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import tomllib

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "dscompress"
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LAYERS = next(c for c in CONTRACTS if c["type"] == "layers")["layers"]
SUBPACKAGES = [name.strip() for layer in LAYERS for name in layer.split("|")]


def lint_imports() -> subprocess.CompletedProcess:
    command = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)


def test_import_contracts_are_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout


def test_a_broken_contract_is_caught(tmp_path):
    """A copy of the package where the bottom layer imports the CLI must fail the check."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "dscompress", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    errors = copy / "dscompress" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom dscompress.cli import render  # noqa\n")
    command = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    result = subprocess.run([command, "--no-cache"], cwd=copy, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(copy)})
    assert result.returncode != 0
    assert "dscompress.core.errors -> dscompress.cli.render" in result.stdout


def test_every_subpackage_is_in_a_layer():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == set(SUBPACKAGES), "add new subpackages to the layers contract in pyproject.toml"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_package_import_inside_a_function(path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            bad = [n for n in names if n.startswith("dscompress")]
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]} inside a function: a layering bug to fix, not to hide"


def test_readme_layout_is_the_package_docstrings():
    readme = (ROOT / "README.md").read_text()
    for name in SUBPACKAGES:
        doc = " ".join(importlib.import_module(f"dscompress.{name}").__doc__.split())
        first = doc.split(". ")[0].rstrip(".")
        assert f"| `{name}/` |" in readme, f"README's layout table lacks {name}/"
        assert first in " ".join(readme.split()), f"README's line for {name}/ is not its docstring's first sentence"
