"""The package's layering: each module imports only from the layers below it, with no cycles
and no imports of dscompress modules hidden inside functions (see "How the code is laid out" in
the README)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "dscompress")

# Module -> layer; a module may import from lower layers, and from earlier modules of its own
# layer as listed (the transforms build on each other: train on distill, export on validate).
LAYERS = [
    ["errors", "_util", "config"],
    ["decompose", "layers", "metrics", "selection"],
    ["models", "data", "ort"],
    ["convert", "calibrate", "prune_tp", "prune", "distill", "distributed", "checkpoint", "evaluate", "train",
     "onnx_passes", "validate", "export", "bench", "units", "profile", "latency", "plan"],
    ["artifact", "runstate"],
    ["steps"],
    ["render", "report"],
    ["recipe", "pipeline", "commands", "cli"],
]
ORDER = {name: (layer, position) for layer, names in enumerate(LAYERS) for position, name in enumerate(names)}


def modules() -> dict[str, ast.Module]:
    found = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
            with open(os.path.join(PACKAGE, name)) as f:
                found[name[:-3]] = ast.parse(f.read())
    return found


def imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(dscompress module imported, line, inside a function) for every import of the package."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(node) for node in ast.walk(fn))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dscompress"):
            names = [node.module] if node.module != "dscompress" else [f"dscompress.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("dscompress")]
        for name in names:
            module = name.split(".")[1] if "." in name else None
            if module:
                found.append((module, node.lineno, id(node) in inside))
    return found


def test_every_module_has_a_layer():
    assert set(modules()) == set(ORDER), "add new modules to LAYERS (and to the README's table)"


@pytest.mark.parametrize("name", sorted(ORDER))
def test_imports_only_from_below(name):
    tree = modules()[name]
    for module, line, in_function in imports(tree):
        assert not in_function, f"{name}.py:{line} imports dscompress.{module} inside a function: a layering bug to fix, not to hide"
        if module not in ORDER:  # the package itself (__version__)
            continue
        assert ORDER[module] < ORDER[name], f"{name}.py:{line} imports dscompress.{module}, which is not below it"
