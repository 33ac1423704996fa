"""The kernel transport: the seam under :class:`sevmon.sev.vm.SevVm`.

The VMM drives SEV only through this: ioctls on the VM fd (``KVM_MEMORY_ENCRYPT_OP``) and on ``/dev/sev``, with
packed structs in buffers of its own process memory. Two implementations: the real kernel
(:class:`sevmon.sev.linux.LinuxSevTransport`) and the platform model (:class:`sevmon.model.sim_kvm.SimulatedKvm`);
:func:`sevmon.machine.launch.sev_kernel` chooses one. A new transport (another hypervisor's SEV interface)
implements this Protocol and nothing above it changes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sevmon.memory.ram import GuestRAM

from .cpuid import SevCpuid
from .stats import KernelStats


@runtime_checkable
class KernelTransport(Protocol):
    """``ioctl`` is one round trip into the kernel; ``alloc``/``read``/``write``/``free`` manage the VMM's own
    buffers (host virtual addresses, as the ioctl structs carry them); ``map_guest_ram`` maps guest RAM into the
    VMM and returns its HVA; ``guest_store``/``guest_load`` are the guest's own (C-bit) accesses."""

    vm_fd: int
    sev_fd: int
    stats: KernelStats

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int: ...

    def alloc(self, n: int) -> int: ...

    def free(self, hva: int) -> None: ...

    def read(self, hva: int, n: int) -> bytes: ...

    def write(self, hva: int, data: bytes) -> None: ...

    def map_guest_ram(self, ram: GuestRAM) -> int: ...

    def cpuid(self) -> SevCpuid: ...

    def guest_store(self, gpa: int, data: bytes, *, c_bit: bool = True) -> None: ...

    def guest_load(self, gpa: int, n: int, *, c_bit: bool = True) -> bytes: ...

    def create_vcpu(self, save_area: bytes) -> int:
        """A new vCPU whose reset state is this VMCB save area (SEV-ES: what LAUNCH_UPDATE_VMSA encrypts)."""

    def close(self) -> None: ...
