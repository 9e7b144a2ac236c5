"""The import rules of docs/ARCHITECTURE.md, checked on the source: who imports whom.

- The import graph of lxmert/, kernels/, engine/ and benchmarks/ has no cycle, counting every import (the ones
  inside functions too: a lazy import that closes a cycle is still one), but those under `if TYPE_CHECKING:`,
  which never run.
- No module takes a private name (`_name`) from another module.
- lxmert/ never imports engine/ or benchmarks/, and knows no command line (argparse); kernels/ imports nothing of
  the project but itself.
- engine/train.py and engine/tasks/ never import each other, not even under `if TYPE_CHECKING:`: a task sees the
  run through engine/context.py's TaskContext.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lxmert", "kernels", "engine", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = modules()


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, type_checking: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import statement of `module`; those under
    `if TYPE_CHECKING:` only with type_checking."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
        if not type_checking
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from engine.data import store`: the module itself
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((source, [alias.name], node.lineno))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports(module):
            while target and target not in MODULES:  # `import engine.data.store` names a module; else its parent
                target = target.rpartition(".")[0]
            if target and target != module:
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_no_module_takes_a_private_name_from_another():
    taken = [
        f"{MODULES[m].relative_to(REPO)}:{line} takes {name} from {source}"
        for m in MODULES
        for source, names, line in imports(m)
        for name in names
        if name.startswith("_") and source != m
    ]
    assert taken == []


def test_the_model_knows_no_engine_and_no_command_line():
    for module, path in MODULES.items():
        targets = {t.split(".")[0] for t, _, _ in imports(module)}
        if module.startswith("lxmert"):
            assert not targets & {"engine", "benchmarks"}, module
            assert "argparse" not in path.read_text(encoding="utf-8"), f"{module} has a command line"
        if module.startswith("kernels"):
            assert targets <= {"kernels"}, module


def _edges_between_train_and_tasks() -> list[str]:
    def is_task(name: str) -> bool:
        return name == "engine.tasks" or name.startswith("engine.tasks.")

    found = []
    for module in MODULES:
        for target, _, line in imports(module, type_checking=True):
            if (module == "engine.train" and is_task(target)) or (is_task(module) and target == "engine.train"):
                found.append(f"{MODULES[module].relative_to(REPO)}:{line} imports {target}")
    return found


def test_the_loop_and_the_tasks_never_import_each_other():
    assert _edges_between_train_and_tasks() == []


def test_the_checker_sees_type_checking_imports_when_asked():
    """engine/context.py names the runtime for its annotations only."""
    assert "engine.runtime" not in {t for t, _, _ in imports("engine.context")}
    assert "engine.runtime" in {t for t, _, _ in imports("engine.context", type_checking=True)}


def test_the_checker_sees_a_cycle_and_a_private_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_architecture_document_states_these_rules():
    """docs/ARCHITECTURE.md is the one description of the layout: it names every package checked here."""
    text = (REPO / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    assert "tests/test_architecture.py" in text
    assert all(f"{package}/" in text for package in PACKAGES)
