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


def build(runner) -> tuple[CommandRegistry, HumanMonitor]:
    """The QMP registry and the human monitor for ``runner``'s machine, every command registered."""
    from sevmon.commands import control, dump, memory, runstate, sev, sevmem

    registry = CommandRegistry(Schema())
    hmp, info = CommandTable(), CommandTable()
    for module in (control, runstate, sev, memory, dump, sevmem):
        module.register(registry, hmp, info)
    return registry, HumanMonitor(runner, hmp, info)
