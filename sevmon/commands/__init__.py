"""Monitor commands: the QMP handlers, and the HMP table built on the same functions.

Each module covers one area (control, run state, SEV, memory, dump). QMP handlers take
``(ctx, **arguments)`` already checked against ``schemas/``; HMP handlers print text and
call the same functions, turning a QMPError into QEMU's ``Error: ...`` line.
"""

from __future__ import annotations

from sevmon.hmp.monitor import HumanMonitor
from sevmon.hmp.table import CommandTable
from sevmon.qmp.dispatch import CommandRegistry
from sevmon.qmp.schema import Schema


def build(machine) -> tuple[CommandRegistry, HumanMonitor]:
    """The QMP registry and the human monitor for ``machine``, every command registered."""
    from sevmon.commands import control, runstate  # noqa: PLC0415 (registration order)

    registry = CommandRegistry(Schema())
    hmp, info = CommandTable(), CommandTable()
    for module in (control, runstate, *_optional_modules()):
        module.register(registry, hmp, info)
    return registry, HumanMonitor(machine, hmp, info)


def _optional_modules():
    """Areas added as they land (SEV, memory); each has register(registry, hmp, info)."""
    import importlib

    out = []
    for name in ("sev", "memory", "dump", "migration"):
        try:
            out.append(importlib.import_module(f"sevmon.commands.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"sevmon.commands.{name}":
                raise
    return out
