"""The package's imports point down only: no circle between fmkernels' modules, counting every
import a module makes (those inside functions too), and no layer imports one above it
(DESIGN.md's layer map)."""

import ast
import pathlib

import pytest

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "python"

#: Each layer, and the layers above it that it must not import (prefixes of module names).
FORBIDDEN = {
    "fmkernels.ops": ("fmkernels.model", "fmkernels.cli", "fmkernels.benchmark", "fmkernels.testing",
                      "fmkernels.integrations"),
    "fmkernels.reference": ("fmkernels.model", "fmkernels.cli", "fmkernels.benchmark", "fmkernels.testing"),
    "fmkernels.model": ("fmkernels.cli", "fmkernels.benchmark", "fmkernels.testing", "fmkernels.integrations"),
    "fmkernels.model.network": ("fmkernels.model.checkpoint", "fmkernels.model.generation"),
    "fmkernels.model.checkpoint": ("fmkernels.model.generation",),
    "fmkernels.benchmark": ("fmkernels.cli",),
    "fmkernels.testing": ("fmkernels.cli",),
}


def _modules():
    """Module name -> (path, is a package's __init__)."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _imports(name, path, package, modules):
    """The fmkernels modules that module ``name`` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
            else:
                base = []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in modules else target)
    return {module for module in found if module in modules and module != name}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, package, modules) for name, (path, package) in modules.items()}


def _cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail)
                if found:
                    return found
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def _within(module, prefix):
    return module == prefix or module.startswith(prefix + ".")


def test_the_package_has_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for module, imported in sorted(_graph().items()):
        for layer, above in FORBIDDEN.items():
            if _within(module, layer):
                wrong += [f"{module} imports {target}" for target in sorted(imported)
                          if any(_within(target, forbidden) for forbidden in above)]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_a_circle_and_an_import_inside_a_function(tmp_path):
    # The checks themselves, on made-up modules: they must be able to fail.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "x.py"
    module.write_text("import fmkernels.ops\n\ndef f():\n    from ..generation import y\n    from . import z\n")
    modules = {"fmkernels.ops": None, "fmkernels.model.generation.y": None, "fmkernels.model.network.z": None}
    assert _imports("fmkernels.model.network.x", module, False, modules) == {
        "fmkernels.ops", "fmkernels.model.generation.y", "fmkernels.model.network.z"}


@pytest.mark.parametrize("package", ["fmkernels.model.network", "fmkernels.model.checkpoint",
                                     "fmkernels.model.generation"])
def test_each_model_layer_is_a_package(package):
    assert package in _modules()
