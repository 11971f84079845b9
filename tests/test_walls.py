"""The package's walls, read from the source with ``ast`` (function-level imports count too).

- no import cycle anywhere in torchtool;
- core never imports typer/click or the command line (torchtool.cli, torchtool.commands);
- core's layers: the bottom (output, files, runtime, env, ...) imports nothing above it; data and
  models import only the bottom; infer imports those; features, train, evaluate and inspect import
  the layers below and never one another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torchtool

PACKAGE = Path(torchtool.__file__).parent

# Every core module or package sits in one layer; a new one must be placed here.
LAYERS = {
    "output": 0, "files": 0, "runtime": 0, "env": 0, "gpu": 0, "video": 0,
    "data": 1, "models": 1,
    "infer": 2,
    "features": 3, "train": 3, "evaluate": 3, "inspect": 3,
    "demo": 1,  # the demo's inputs and command lines: it runs the commands through the CLI, never imports them
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The most specific torchtool module that ``name`` (a module or a name inside one) refers to."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def imports_of(module: str) -> set[str]:
    """Every import in ``module``'s source (absolute names; ``from X import Y`` gives X.Y when that is a module)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)  # importing a submodule runs it, not just the package
    return found


GRAPH = {m: {t for imp in imports_of(m) if (t := _resolve(imp)) and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_function_level_imports_are_read():
    # finetune's command imports the training code inside its function: the edge must be seen.
    assert "torchtool.core.train" in GRAPH["torchtool.commands.finetune"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("torchtool.core")))
def test_core_does_not_know_the_command_line(module):
    bad = [imp for imp in imports_of(module)
           if imp.split(".")[0] in ("typer", "click") or imp.startswith(("torchtool.cli", "torchtool.commands"))]
    assert bad == [], f"{module} imports {bad}"


def _domain(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "core" else None


def test_every_core_module_has_a_layer():
    domains = {_domain(m) for m in MODULES} - {None}
    assert domains <= set(LAYERS), f"place {sorted(domains - set(LAYERS))} in LAYERS"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _domain(m)))
def test_core_layers(module):
    mine = _domain(module)
    for target in GRAPH[module]:
        theirs = _domain(target)
        if theirs is None or theirs == mine:
            continue
        if LAYERS[mine] == 0:
            assert LAYERS[theirs] == 0, f"{module} (bottom layer) imports {target}"
        else:
            assert LAYERS[theirs] < LAYERS[mine], f"{module} imports {target}, which is not below it"


def test_evaluate_could_import_models_data_and_infer_without_train():
    reach, todo = set(), ["torchtool.core.infer", "torchtool.core.models.build", "torchtool.core.data.loading"]
    while todo:
        for target in GRAPH[todo.pop()] - reach:
            reach.add(target)
            todo.append(target)
    assert not any(_domain(m) == "train" for m in reach)
