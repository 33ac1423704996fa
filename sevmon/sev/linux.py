"""The kernel transport on real hardware: the same packed structs as the simulation, issued
with ioctl(2) on a real VM fd and /dev/sev. On a host without SEV, asking for it fails
with one sentence (``SevUnavailable``), never a traceback.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from sevmon.memory.ram import RAM

from .abi import KVM_CREATE_VM, PAGE_SHIFT
from .cpuid import LEAF, SevCpuid
from .stats import KernelStats


class SevUnavailable(RuntimeError):
    """This host cannot run SEV guests; ``str()`` is one sentence saying why."""



def _libc_ioctl(fd: int, request: int, arg: int) -> int:
    """ioctl(2) with a pointer-sized argument (``fcntl.ioctl`` only takes a C int or a buffer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.ioctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    r = fn(fd, request, arg or None)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


class LinuxSevTransport:
    """The same surface as :class:`SimulatedKvm`, on a real host: packed structs in this
    process's memory, ``fcntl.ioctl`` on a real VM fd and ``/dev/sev``.

    Guest RAM is an anonymous mapping seeded from the RAM store; the guest's own CPU accesses
    and fault injection do not exist here. Only ``round_trips`` is counted (the PSP is opaque).
    """

    def __init__(self, vm_fd: int | None = None, *, sev_path: str = "/dev/sev", kvm_path: str = "/dev/kvm"):
        if not os.path.exists(sev_path):
            raise SevUnavailable(
                f"SEV is not available on this host: {sev_path} does not exist (needs an AMD EPYC host with "
                "SEV enabled in the BIOS and the kvm_amd.sev=1 module parameter)")
        try:
            self.sev_fd = os.open(sev_path, os.O_RDWR)
        except OSError as e:
            raise SevUnavailable(f"SEV is not available to this process: cannot open {sev_path}: {e.strerror}") from None
        self._own_vm = vm_fd is None
        try:
            if vm_fd is None:
                kvm = os.open(kvm_path, os.O_RDWR)
                try:
                    vm_fd = _libc_ioctl(kvm, KVM_CREATE_VM, 0)
                finally:
                    os.close(kvm)
        except OSError as e:
            os.close(self.sev_fd)
            raise SevUnavailable(f"SEV is not available to this process: cannot create a VM with {kvm_path}: "
                                 f"{e.strerror}") from None
        self.vm_fd = vm_fd
        self.stats = KernelStats()
        self._bufs: dict[int, ctypes.Array] = {}
        self._maps: list[mmap.mmap] = []

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        self.stats.round_trips += 1
        return _libc_ioctl(fd, request, arg)

    def alloc(self, n: int) -> int:
        buf = ctypes.create_string_buffer(max(n, 1))
        addr = ctypes.addressof(buf)
        self._bufs[addr] = buf
        return addr

    def free(self, hva: int) -> None:
        self._bufs.pop(hva, None)

    def read(self, hva: int, n: int) -> bytes:
        return ctypes.string_at(hva, n)

    def write(self, hva: int, data: bytes) -> None:
        ctypes.memmove(hva, bytes(data), len(data))

    def map_guest_ram(self, ram: RAM) -> int:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        m = mmap.mmap(-1, ram.size, flags=flags)
        self._maps.append(m)
        for pfn in ram.frames():
            m[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT] = ram.frame(pfn)
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    def cpuid(self) -> SevCpuid:
        try:
            fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
            try:
                regs = os.pread(fd, 16, LEAF)
            finally:
                os.close(fd)
        except OSError as e:
            raise SevUnavailable(f"cannot read CPUID Fn8000_001F: /dev/cpu/0/cpuid: {e.strerror} "
                                 "(load the cpuid module)") from None
        return SevCpuid(*(int.from_bytes(regs[i:i + 4], "little") for i in range(0, 16, 4)))

    def guest_store(self, gpa: int, data: bytes, *, c_bit: bool = True) -> None:
        raise SevUnavailable("the guest's own CPU accesses exist only in the simulation")

    def guest_load(self, gpa: int, n: int, *, c_bit: bool = True) -> bytes:
        raise SevUnavailable("the guest's own CPU accesses exist only in the simulation")

    def close(self) -> None:
        if self._own_vm:
            os.close(self.vm_fd)
        os.close(self.sev_fd)
