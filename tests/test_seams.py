"""The declared seams (typing.Protocol) and what implements them: a new guest RAM, kernel transport, QEMU link or
debug memory is checked against the same list of members the code above it uses."""

from __future__ import annotations

import inspect

from sevmon.attach.link import QemuLink
from sevmon.attach.qemu_link import QemuMonitorLink
from sevmon.attach.ram import MappedRAM
from sevmon.debug import MachineMemory
from sevmon.machine.builder import build_machine
from sevmon.machine.interface import Machine
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import RAM, GuestRAM
from sevmon.model import SimulatedKvm
from sevmon.sev.linux import LinuxSevTransport
from sevmon.sev.transport import KernelTransport
from sevmon.sev.vm import SevVm


def _methods(proto) -> set[str]:
    return {n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_guest_ram_both_kinds():
    assert isinstance(RAM(1 << 20), GuestRAM)
    assert isinstance(MappedRAM([], {}, 0), GuestRAM)


def test_kernel_transport_model_and_hardware():
    assert isinstance(SimulatedKvm(), KernelTransport)
    assert _methods(KernelTransport) <= set(dir(LinuxSevTransport))  # /dev/sev is absent here: the class


def test_qemu_link():
    assert isinstance(QemuLink("/nonexistent"), QemuMonitorLink)


def test_a_machine_exposes_its_debug_memory_and_sev_guest():
    machine = build_machine(GuestSpec(memory_mib=64, workload=False))
    try:
        assert isinstance(machine, Machine)
        assert isinstance(machine.memory, MachineMemory)
        assert isinstance(machine.sev, SevVm)
        assert isinstance(machine.sev.kernel, KernelTransport)
    finally:
        machine.quit()
