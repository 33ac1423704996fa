"""Every monitor command registered: the QMP registry and the human monitor for one machine.

Apart from ``sevmon/commands/__init__.py`` so that the package imports none of its modules: ``runstate`` imports
``dump`` (a dump in progress blocks ``cont``), and a package whose ``__init__`` imported its modules back would
make the two import each other.
"""

from __future__ import annotations

from sevmon.commands import control, dump, guest_kernel, memory, migration, runstate, sev, sev_memory_map
from sevmon.hmp.monitor import HumanMonitor
from sevmon.hmp.table import CommandTable
from sevmon.qmp.dispatch import CommandRegistry
from sevmon.qmp.schema import Schema


def build(runner) -> tuple[CommandRegistry, HumanMonitor]:
    """The QMP registry and the human monitor for ``runner``'s machine, every command registered."""
    registry = CommandRegistry(Schema())
    hmp, info = CommandTable(), CommandTable()
    for module in (control, runstate, sev, memory, dump, sev_memory_map, migration, guest_kernel):
        module.register(registry, hmp, info)
    return registry, HumanMonitor(runner, hmp, info)
