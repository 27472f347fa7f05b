"""Imports point one way: the import graph of pairaug_ray/ has no cycle and no upward edge.

Usage: .venv/bin/pytest tests/unit/test_layering.py

Layers, from the bottom up (a module may import its own layer and the layers below it):

0. errors, schema, vocab, io/
1. labeler, phantom/, models/, llm/
2. stages/
3. runtime, console, checks
4. pipeline, estimate, run_report, train/, serve/
5. config
6. cli

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pairaug_ray"

LAYERS = [
    ("errors", "schema", "vocab", "io", ""),     # "" = the package's own __init__ (version only)
    ("labeler", "phantom", "models", "llm"),
    ("stages",),
    ("runtime", "console", "checks"),
    ("pipeline", "estimate", "run_report", "train", "serve"),
    ("config",),
    ("cli",),
]


def layer_of(module: str) -> int:
    """Layer index of a ``pairaug_ray.x.y`` module name."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's layout)")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the pairaug_ray modules it imports (resolved to modules that exist)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if t.split(".")[0] != "pairaug_ray":
                    continue
                r = resolve(t)
                if r and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})"
                  for m, targets in graph.items() for n in targets if layer_of(n) > layer_of(m))


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    assert upward_imports(import_graph()) == []


def test_only_the_cli_has_a_main_block():
    mains = [m for m, p in modules().items() if '__name__ == "__main__"' in p.read_text()]
    assert mains == ["pairaug_ray.cli"]


def test_every_module_says_what_it_is():
    missing = [m for m, p in modules().items()
               if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_the_checker_catches_cycles_and_upward_imports(tmp_path):
    pkg = tmp_path / "pairaug_ray"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "labeler.py").write_text("def f():\n    from pairaug_ray.stages import thing\n")
    (pkg / "stages" / "thing.py").write_text("from pairaug_ray import labeler\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) is not None
    assert "pairaug_ray.labeler (layer 1) imports pairaug_ray.stages.thing (layer 2)" in upward_imports(graph)


@pytest.mark.parametrize("name", ["TRAIN_SOURCES", "ABLATION_VARIANTS"])
def test_cli_help_lists_match_the_vocabulary(name):
    from pairaug_ray import cli, vocab

    assert getattr(cli, name) == ", ".join(getattr(vocab, name))
