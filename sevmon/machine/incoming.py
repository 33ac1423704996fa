"""The target of a migration (``sevmon serve --incoming URI``, QEMU's ``-incoming``).

The machine starts in ``inmigrate`` with an SEV context (KVM_SEV_INIT, RAM registered) but
no launch: its guest arrives by RECEIVE_* (:mod:`sevmon.commands.migration`). The guest
options must describe the same machine as the source's (RAM size, C-bit), as QEMU requires
the same command line on both ends. ``cont`` in ``inmigrate`` only asks to run once the
guest has arrived (QEMU's autostart), as it does under QEMU's ``-S``.
"""

from __future__ import annotations

from sevmon.machine.cpu import CpuState
from sevmon.machine.pflash import FOUR_GIB
from sevmon.machine.ram import RAM
from sevmon.machine.vm import Machine, MachineConfig


class IncomingMachine(Machine):
    """A Machine waiting for its guest."""

    def __init__(self, *a, autostart: bool = True, **kw):
        super().__init__(*a, **kw)
        self.status = "inmigrate"
        self.autostart = autostart

    def cont(self) -> None:
        if self.status == "inmigrate":
            self.autostart = True  # qmp_cont: run when the incoming migration completes
            return
        super().cont()


def build_incoming(args) -> Machine:
    from sevmon.machine.builder import _sev_kernel
    from sevmon.sev.vm import SevVm

    ram = RAM(FOUR_GIB if args.pflash else args.memory << 20)
    sev = SevVm(ram, policy=args.policy, cbitpos=args.cbitpos, reduced_phys_bits=args.reduced_phys_bits,
                kernel=_sev_kernel(args))
    config = MachineConfig(kvm_enabled=True, source="incoming", debug_policy=args.debug_policy == "on")
    config.extra["incoming"] = args.incoming
    cpu = CpuState(0, {"cr0": 0x60000010, "rip": 0xFFF0, "cs": 0xF000, "cs_base": 0xFFFF0000})
    return IncomingMachine(ram, [cpu], config=config, sev=sev, autostart=not args.prelaunch)
