"""The target of a migration (``sevmon serve --incoming URI``, QEMU's ``-incoming``).

The machine starts in ``inmigrate`` with an SEV context (KVM_SEV_INIT, RAM registered) but
no launch: its guest arrives by RECEIVE_* (:mod:`sevmon.commands.migration`). The guest
options must describe the same machine as the source's (RAM size, C-bit), as QEMU requires
the same command line on both ends. ``cont`` in ``inmigrate`` only asks to run once the
guest has arrived (QEMU's autostart), as it does under QEMU's ``-S``.
"""

from __future__ import annotations

from sevmon.machine.interface import MachineConfig, RunState
from sevmon.machine.launch import open_sev
from sevmon.machine.local import LocalMachine
from sevmon.machine.pflash import FOUR_GIB
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import PAGE_SHIFT, RAM
from sevmon.x86.cpu import CpuState


class IncomingMachine(LocalMachine):
    """A LocalMachine waiting for its guest: ``uri`` is where it comes from."""

    def __init__(self, *a, uri: str, autostart: bool = True, **kw):
        super().__init__(*a, prelaunch=True, **kw)
        self.uri = uri
        self.autostart = autostart
        self.transition(RunState.INMIGRATE)

    def cont(self) -> None:
        if self.state is RunState.INMIGRATE:
            self.autostart = True  # qmp_cont: run when the incoming migration completes
            return
        super().cont()

    def arrived(self, cpus: list[CpuState]) -> None:
        """RECEIVE_FINISH is done: the guest's vCPUs are here; it runs now unless -S asked to wait."""
        self.cpus[:] = cpus
        self.transition(RunState.PAUSED)
        self._invalidate()
        if self.autostart:
            self.cont()


def build_incoming(spec: GuestSpec, memory_for) -> IncomingMachine:
    mem_top = spec.memory_mib << 20
    ram = RAM(FOUR_GIB if spec.pflash else mem_top, dense_top=mem_top)  # as the source's: all of --memory is RAM
    sev = open_sev(ram, spec.sev)
    ram.blank = lambda pfn: sev.guest_zero_page(pfn << PAGE_SHIFT)  # zeros under the key RECEIVE_START makes
    config = MachineConfig(kvm_enabled=True, memory_encryption=True, source="incoming",
                           debug_policy=spec.debug_policy)
    cpu = CpuState(0, {"cr0": 0x60000010, "rip": 0xFFF0, "cs": 0xF000, "cs_base": 0xFFFF0000})
    return IncomingMachine(ram, [cpu], memory_for(ram, sev), config=config, sev=sev, uri=spec.incoming,
                           autostart=not spec.prelaunch)
