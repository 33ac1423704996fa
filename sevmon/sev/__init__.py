"""The real SEV path, one module per layer (bottom to top); nothing here imports the platform model
(``sevmon.model``), which plugs in below :class:`SevVm` as one more kernel transport.

- ``abi``       byte-exact uapi and PSP mailbox structs, ioctl numbers, status codes, states
- ``cpuid``     CPUID Fn8000_001F (C-bit position, ASID ranges)
- ``stats``     the kernel's counters (round trips, firmware calls, bytes), simulated or real
- ``dbgsplit``  what Linux's classic ``sev_dbg_crypt`` makes of one DBG request (the real transport counts by it)
- ``linux``     the kernel transport on real hardware (/dev/kvm, /dev/sev)
- ``vm``        the VMM (QEMU's sev.c) over a kernel transport given to it: the only class the rest of sevmon uses;
  ``migration_vmm`` its SEND/RECEIVE half (on the structs of ``kvm_migration``), ``owner_files`` the guest owner's
  files it reads
- ``mirror``    a mirror VM on the SEV guest of a running QEMU (attach)
"""

from .cpuid import SevCpuid
from .linux import LinuxSevTransport, SevUnavailable
from .stats import KernelStats
from .vm import SevError, SevVm

__all__ = [
    "KernelStats",
    "LinuxSevTransport",
    "SevCpuid",
    "SevError",
    "SevUnavailable",
    "SevVm",
]
