"""The package's import graph, read from the source (function-local imports included): no circle,
a core that does not depend on the model organisms, and function-local imports only with a reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_safety"
CORE = ("models", "data", "esi", "optim", "judges", "evaluation", "modules")
LOCAL_IMPORT_REASON = "# local:"
"""A function-local import of a lit_safety module carries this comment on its line, with the reason."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lit_safety module, line, inside a function) for every import in the file; ``from
    X import name`` counts as X.name when that is a module of the package, else as X."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("lit_safety"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("lit_safety"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in modules else child.module, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {target for target, _, _ in imports(path)}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), and self-imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_hidden_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_counting_function_local_imports():
    assert cycles(graph()) == []


def test_core_packages_never_import_the_organisms():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.split(".")[1] in CORE if name.count(".") else False:
            offenders += [f"{name}:{line} -> {target}" for target, line, _ in imports(path)
                          if target.startswith("lit_safety.organism")]
    assert offenders == []


def test_function_local_imports_of_the_package_carry_a_reason():
    missing = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for target, line, local in imports(path):
            if local and LOCAL_IMPORT_REASON not in lines[line - 1]:
                missing.append(f"{module_name(path)}:{line} imports {target} inside a function")
    assert missing == []
