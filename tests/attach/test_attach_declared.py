"""Who runs a command when sevmon is attached is declared where the command is registered: the attached
command set is built from those declarations, and a command of a module that touches guest memory that
declares nothing stops the build (it cannot silently go to QEMU, which would read the memory itself)."""

from __future__ import annotations

import pytest

from sevmon.attach.commands import UndeclaredCommand, _collect, check_declared
from sevmon.commands import dump, memory, sev_memory_map
from sevmon.hmp.table import OWN, QEMU, QEMU_READS_MEMORY
from sevmon.qmp.schema import Schema


def test_every_memory_command_declares_who_runs_it_attached():
    registry, hmp, info = _collect(Schema(), (memory, dump, sev_memory_map))
    check_declared(registry, hmp, info)
    assert {n for n, who in registry.attached.items() if who == OWN} >= {
        "memsave", "pmemsave", "dump-guest-memory", "query-sev-debug-stats", "sev-mem-map", "query-sev-memory-map"}
    assert info.find("registers").attached == QEMU  # QEMU's own registers, as it shows them
    x = hmp.find("x")
    assert x.when_attached({"format": "x"}) == OWN and x.when_attached({"format": "i"}) == QEMU_READS_MEMORY


def test_a_new_memory_command_without_a_declaration_stops_the_attached_build():
    registry, hmp, info = _collect(Schema(), (memory, dump, sev_memory_map))

    @hmp.command("xq", "addr:l", "addr", "a new memory command")
    def xq(ctx, addr):
        pass

    with pytest.raises(UndeclaredCommand, match="xq"):
        check_declared(registry, hmp, info)
