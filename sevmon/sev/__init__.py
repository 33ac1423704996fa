"""The SEV platform, one module per layer (bottom to top):

- ``abi``       byte-exact uapi and PSP mailbox structs, ioctl numbers, status codes, states
- ``engine``    the memory encryption engine (per-ASID AES, physical-address tweak)
- ``cpuid``     CPUID Fn8000_001F (C-bit position, ASID ranges)
- ``firmware``  the PSP: platform/guest state machines, launch measurement, DBG
- ``transport`` the kernel: KVM_MEMORY_ENCRYPT_OP (simulated classic Linux, or real ioctls)
- ``vm``        the VMM (QEMU's sev.c): the only class the rest of sevmon uses
"""

from .cpuid import SevCpuid
from .transport import KernelStats, LinuxSevTransport, SevUnavailable, SimulatedHost, SimulatedKvm
from .vm import SevError, SevVm

__all__ = [
    "KernelStats",
    "LinuxSevTransport",
    "SevCpuid",
    "SevError",
    "SevUnavailable",
    "SevVm",
    "SimulatedHost",
    "SimulatedKvm",
]
