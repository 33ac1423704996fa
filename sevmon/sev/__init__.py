"""The SEV platform, one module per layer (bottom to top):

- ``abi``       byte-exact uapi and PSP mailbox structs, ioctl numbers, status codes, states
- ``engine``    the memory encryption engine (per-ASID AES, physical-address tweak)
- ``cpuid``     CPUID Fn8000_001F (C-bit position, ASID ranges)
- ``firmware``  the PSP: platform/guest state machines, launch measurement, DBG; ``channel`` (the guest owner's
  ECDH session: KEK/KIK, TEK/TIK) and ``firmware_migration`` (SEND_*/RECEIVE_*) are its parts
- ``stats``     the kernel's counters (round trips, firmware calls, bytes), simulated or real
- the simulated kernel:
  - ``hostmem``     host physical memory as the PSP sees it
  - ``sim_host``    the host: DRAM, memory controller, PSP, ASID bitmaps
  - ``sim_process`` a VMM process's memory: mappings, copy_{from,to}_user, pinning, memlock
  - ``sim_task``    processes: pid, credentials, fd table, pidfd_open/pidfd_getfd (VM ownership, mirrors)
  - ``sim_kvm``     a VM fd: KVM_MEMORY_ENCRYPT_OP and its ops; ``sim_dbg`` (sev_dbg_crypt, classic) and
    ``sim_devsev`` (/dev/sev) and ``sim_migration`` (SEND_*/RECEIVE_*) are its parts
- ``linux``     the same ioctls on real hardware (/dev/kvm, /dev/sev); imports nothing simulated
- ``vm``        the VMM (QEMU's sev.c): the only class the rest of sevmon uses; ``migration_vmm`` its SEND/RECEIVE
  half (on the structs of ``kvm_migration``), ``owner_files`` and ``platform_store`` the files it reads
"""

from .cpuid import SevCpuid
from .linux import LinuxSevTransport, SevUnavailable
from .sim_host import SimulatedHost
from .sim_kvm import SimulatedKvm
from .stats import KernelStats
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
