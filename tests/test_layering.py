"""Imports point down the layers; siblings talk over the wire, never by import."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "d3arrow"

# Lowest first. A module may import modules of lower layers only.
LAYERS = [
    {"errors", "addressing", "task", "arena", "keys", "numpy_allocator"},
    {"serialize", "security", "scheduling", "metrics", "checks"},
    {"protocol", "spill"},
    {"store", "values", "memory"},
    {"comm", "eventloop", "redis_center"},
    {"core", "metadata"},
    {"transfer", "center_link", "placement", "references", "direct"},
    {"fetching", "calls", "futures", "dashboard", "functions"},
    {"center", "worker", "cluster", "lineage", "progress"},
    {"client", "graphs"},
    {"pool"},
    {"executor"},
    {"__init__"},
    {"cli"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def concept(path):
    relative = path.relative_to(PACKAGE)
    return "cli" if relative.parts[0] == "cli" else relative.stem


def _is_module(parts):
    place = PACKAGE.joinpath(*parts)
    return place.is_dir() or place.with_suffix(".py").exists()


def internal_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(path.relative_to(PACKAGE).parts[:-1])[: len(path.relative_to(PACKAGE).parts) - node.level]
            if node.module:
                targets = [base + node.module.split(".")]
            else:  # from . import name: a module, or a name of the package itself
                targets = [base + [alias.name] if _is_module(base + [alias.name])
                           else base or ["__init__"] for alias in node.names]
            for target in targets:
                yield "cli" if target[0] == "cli" else target[0]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name and name.split(".")[0] == "d3arrow":
                    parts = name.split(".")[1:]
                    yield "cli" if parts and parts[0] == "cli" else (parts[0] if parts else "__init__")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {concept(p) for p in MODULES} <= set(LAYER_OF)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    here = concept(path)
    for target in internal_imports(path):
        if target == here:
            continue
        assert LAYER_OF[target] < LAYER_OF[here], f"{here} imports {target}, which is not below it"
