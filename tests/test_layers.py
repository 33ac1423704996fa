"""The package's layers point down only: no import cycle, and the lower layers never reach up.

Read from the source with ``ast`` (every import, including those inside functions), so a late import cannot hide a
cycle or an upward reference.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sevmon

PKG = Path(sevmon.__file__).parent
LOWER = ("sevmon.memory", "sevmon.x86", "sevmon.debug", "sevmon.sev", "sevmon.model")
UPPER = ("sevmon.machine", "sevmon.commands", "sevmon.qmp", "sevmon.hmp", "sevmon.shell", "sevmon.daemon",
         "sevmon.cli", "sevmon.bench")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d.startswith("sevmon")}
    modules = set(graph)
    # an import of a name inside a module (from x import y) counts as importing x
    return {m: {d if d in modules else d.rpartition(".")[0] for d in deps} & modules - {m}
            for m, deps in graph.items()}


def test_lower_layers_import_nothing_above_them():
    bad = [(m, d) for m, deps in imports().items() if m.startswith(LOWER)
           for d in deps if d.startswith(UPPER)]
    assert bad == []


def test_the_real_path_imports_nothing_of_the_model():
    bad = [(m, d) for m, deps in imports().items() if m.startswith("sevmon.sev")
           for d in deps if d.startswith("sevmon.model")]
    assert bad == []


def test_no_import_cycle():
    graph = imports()
    # packages' __init__ re-export their modules; an edge into a package is an edge to its __init__ only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue  # a package importing its own modules is not a cycle through it
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert visit(m) is None
