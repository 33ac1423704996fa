"""The package's floors: every package and top-level module under ``sevmon/`` has a rank, and every import goes to
its own package or to a lower rank (so no package reaches up, and no two packages on one floor know each other);
no import cycle; the real SEV path imports nothing of the platform model.

Read from the source with ``ast`` (every import, including those inside functions and under TYPE_CHECKING), so a
late import cannot hide a cycle or an upward reference. ARCHITECTURE.md draws the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sevmon

PKG = Path(sevmon.__file__).parent

#: Floor of each package (or top-level module) under sevmon/, bottom (0) to top.
RANKS = {
    # 0: the package's own facts and small OS helpers
    "sevmon": 0, "sevmon.errors": 0, "sevmon.pidfd": 0, "sevmon.unixsock": 0, "sevmon.cmdlog": 0,
    "sevmon.outfile": 0,
    # 1: guest memory at rest; the QMP wire (a library: JSON stream, sessions, dispatch, schema)
    "sevmon.memory": 1, "sevmon.qmp": 1,
    # 2: the real SEV path (VMM over a kernel transport, /dev/kvm, mirror VM, ABI)
    "sevmon.sev": 2,
    # 3: the SEV platform model (one more kernel transport); debug access to guest memory
    "sevmon.model": 3, "sevmon.debug": 3,
    # 4: x86 (paging, translation, registers); the HMP library (parser, table, text formats); sevmon check
    "sevmon.x86": 4, "sevmon.hmp": 4, "sevmon.check": 4,
    # 5: the machines and their factory; pictures; the shell (a client of the HMP library); drgn (a QMP client)
    "sevmon.machine": 5, "sevmon.render": 5, "sevmon.shell": 5, "sevmon.drgn": 5,
    # 6: the monitor commands; the command-line options (GuestSpec)
    "sevmon.commands": 6, "sevmon.options": 6,
    # 7: the gdb stub (a front end over the commands)
    "sevmon.gdb": 7,
    # 8: the daemon (QMP + HMP + gdb on one machine); the bench
    "sevmon.daemon": 8, "sevmon.bench": 8,
    # 9: attach (the daemon's front ends over a running QEMU)
    "sevmon.attach": 9,
    # 10: the command line, the pytest plugin
    "sevmon.cli": 10, "sevmon.testing": 10,
    "sevmon.__main__": 11,
}


def rank_of(module: str) -> int:
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in RANKS:
            return RANKS[name]
    raise KeyError(module)


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


def test_every_package_has_a_rank():
    unranked = sorted({".".join(m.split(".")[:2]) for m in imports()} - set(RANKS))
    assert unranked == []


def test_every_import_goes_down_or_stays_in_its_package():
    bad = []
    for m, deps in imports().items():
        for d in deps:
            own = m.split(".")[:2] == d.split(".")[:2]
            if not own and rank_of(d) >= rank_of(m):
                bad.append((m, d))
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
