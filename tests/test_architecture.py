"""The walls between the packages, checked on the source: every import (module level or inside a function)
of every module, so a lazy import cannot hide a cycle."""

import ast
import os
from collections import defaultdict

import cytoray

ROOT = os.path.dirname(cytoray.__file__)

# Which layer may import which. curation and eval sit side by side on features (neither imports the other);
# training (platform) calls the validator, so it sits above eval, and never needs to know how a manifest was
# curated; model code is a leaf over the shared base modules. export (models, preprocessing, the results table)
# sits beside eval: training ends by exporting its final teacher, so platform may import it.
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "features": {"base", "models", "features"},
    "curation": {"base", "features", "curation"},
    "eval": {"base", "models", "features", "eval"},
    "platform": {"base", "models", "features", "eval", "export", "platform"},
    "testing": {"base", "models", "features", "curation", "eval", "export", "platform", "testing"},
    "export": {"base", "models", "features", "eval", "export"},
}
LAYERS = [
    ("export", lambda m: m.startswith("cytoray.export")),
    ("base", lambda m: m.count(".") == 1 and m not in ("cytoray.testing",)),
    ("models", lambda m: m.startswith("cytoray.platform.models")),
    ("features", lambda m: m.startswith("cytoray.features")),
    ("curation", lambda m: m.startswith("cytoray.curation")),
    ("eval", lambda m: m.startswith("cytoray.eval")),
    ("platform", lambda m: m.startswith("cytoray.platform")),
    ("testing", lambda m: m == "cytoray.testing"),
]


def layer(module: str) -> str:
    return next(name for name, test in LAYERS if test(module))


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports() -> dict[str, set[str]]:
    """{module: every module it imports} for the cytoray package (absolute names; ``from x import y`` counts y when
    y is a module)."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                found[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    graph = defaultdict(set)
    for mod, path in found.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                graph[mod].add(node.module)
                graph[mod].update(f"{node.module}.{a.name}" for a in node.names
                                  if f"{node.module}.{a.name}" in found)
        graph[mod]  # noqa: B018 - modules without imports are nodes too
    return {m: {t for t in targets if t.split(".")[0] != "cytoray" or t in found} for m, targets in graph.items()}


def test_every_import_crosses_only_allowed_walls():
    graph = imports()
    bad = []
    for mod, targets in graph.items():
        for t in targets:
            if not t.startswith("cytoray.") or t == "cytoray":
                continue
            src, dst = layer(mod), layer(t)
            if dst not in ALLOWED[src]:
                bad.append(f"{mod} ({src}) imports {t} ({dst})")
    assert not bad, "\n".join(sorted(bad))


def test_models_and_losses_import_neither_ray_nor_the_pipelines():
    graph = imports()
    for mod, targets in graph.items():
        if mod.startswith(("cytoray.platform.models", "cytoray.platform.loss")):
            assert not {t for t in targets if t.split(".")[0] == "ray"}, mod
            assert not {t for t in targets if t.startswith(("cytoray.curation", "cytoray.eval",
                                                               "cytoray.features"))}, mod


def test_export_imports_no_ray():
    graph = imports()
    for mod, targets in graph.items():
        if mod.startswith("cytoray.export"):
            assert not {t for t in targets if t.split(".")[0] == "ray"}, mod


def test_no_import_cycles_between_modules():
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
