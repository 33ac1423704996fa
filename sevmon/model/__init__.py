"""The software model of the SEV platform: the PSP and the Linux kernel around it, one module per layer (bottom
to top). It is one more kernel transport under :class:`sevmon.sev.vm.SevVm` (beside the real
:class:`sevmon.sev.linux.LinuxSevTransport`), chosen in one place, :func:`sevmon.machine.launch.sev_kernel`.

- the PSP:
  - ``engine``    the memory encryption engine (per-ASID AES, physical-address tweak)
  - ``firmware``  platform/guest state machines, launch measurement, DBG; ``channel`` (the guest owner's ECDH
    session: KEK/KIK, TEK/TIK) and ``firmware_migration`` (SEND_*/RECEIVE_*) are its parts
  - ``platform_store`` its persistent identity (``--sev-platform FILE``)
- the simulated kernel:
  - ``hostmem``     host physical memory as the PSP sees it
  - ``sim_host``    the host: DRAM, memory controller, PSP, ASID bitmaps
  - ``sim_process`` a VMM process's memory: mappings, copy_{from,to}_user, pinning, memlock
  - ``sim_task``    processes: pid, credentials, fd table, pidfd_open/pidfd_getfd (VM ownership, mirrors)
  - ``sim_kvm``     a VM fd: KVM_MEMORY_ENCRYPT_OP and its ops; ``sim_dbg`` (sev_dbg_crypt, classic) and
    ``sim_devsev`` (/dev/sev) and ``sim_migration`` (SEND_*/RECEIVE_*) are its parts
  - ``sim_qemu``    a QEMU process owning a live SEV guest, to attach to through the hardware path
"""

from .sim_host import SimulatedHost
from .sim_kvm import SimulatedKvm

__all__ = ["SimulatedHost", "SimulatedKvm"]
