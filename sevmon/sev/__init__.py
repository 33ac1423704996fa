"""The SEV platform, one module per layer (bottom to top):

- ``abi``       byte-exact uapi and PSP mailbox structs, ioctl numbers, status codes, states
- ``engine``    the memory encryption engine (per-ASID AES, physical-address tweak)
- ``cpuid``     CPUID Fn8000_001F (C-bit position, ASID ranges)
- ``firmware``  the PSP: platform/guest state machines, launch measurement, DBG
- ``hostmem``   host physical memory as the PSP sees it (simulation)
- ``transport`` the kernel: KVM_MEMORY_ENCRYPT_OP, simulated (Linux's classic sev_dbg_crypt)
- ``linux``     the same ioctls on real hardware (/dev/kvm, /dev/sev)
- ``vm``        the VMM (QEMU's sev.c): the only class the rest of sevmon uses
"""

from .cpuid import SevCpuid
from .linux import LinuxSevTransport, SevUnavailable
from .transport import KernelStats, SimulatedHost, SimulatedKvm
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
