"""The kernel transport on real hardware: the same packed structs as the simulation, issued
with ioctl(2) on a real VM fd and /dev/sev. On a host without SEV, asking for it fails
with one sentence (``SevUnavailable``), never a traceback.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from sevmon.memory.ram import RAM

from .abi import (
    KVM_CREATE_VM,
    KVM_MEMORY_ENCRYPT_OP,
    PAGE_SHIFT,
    PAGE_SIZE,
    SEV_ISSUE_CMD,
    KvmSevCmd,
    KvmSevDbg,
    SevCmdId,
)
from .cpuid import LEAF, SevCpuid
from .dbgsplit import classic_dbg_cost
from .stats import KernelStats

# KVM_SEV_* commands that are exactly one PSP command when they succeed
_ONE_COMMAND = frozenset({SevCmdId.GUEST_STATUS, SevCmdId.LAUNCH_MEASURE, SevCmdId.LAUNCH_FINISH,
                          SevCmdId.LAUNCH_SECRET, SevCmdId.GET_ATTESTATION_REPORT})


def _address(m: mmap.mmap) -> int:
    """The address of an mmap (the temporary ctypes view is dropped at once, so the map can be closed)."""
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class SevUnavailable(RuntimeError):
    """This host cannot run SEV guests; ``str()`` is one sentence saying why."""


_ioctl_fn = None


def _libc_ioctl(fd: int, request: int, arg: int) -> int:
    """ioctl(2) with a pointer-sized argument (``fcntl.ioctl`` only takes a C int or a buffer).
    libc's ``ioctl`` is looked up and typed once, on first use."""
    global _ioctl_fn
    fn = _ioctl_fn
    if fn is None:
        fn = ctypes.CDLL(None, use_errno=True).ioctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _ioctl_fn = fn
    r = fn(fd, request, arg or None)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def host_cpuid(path: str = "/dev/cpu/0/cpuid") -> SevCpuid:
    """CPUID Fn8000_001F of this host, through the cpuid driver (Python cannot execute ``cpuid`` itself).
    SevUnavailable (one sentence) when the driver is not there."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            regs = os.pread(fd, 16, LEAF)
        finally:
            os.close(fd)
    except OSError as e:
        raise SevUnavailable(f"cannot read CPUID Fn8000_001F: {path}: {e.strerror} (load the cpuid module: "
                             "modprobe cpuid)") from None
    if len(regs) < 16:
        raise SevUnavailable(f"cannot read CPUID Fn8000_001F: {path}: short read")
    return SevCpuid(*(int.from_bytes(regs[i:i + 4], "little") for i in range(0, 16, 4)))


class LinuxSevTransport:
    """The same surface as :class:`SimulatedKvm`, on a real host: packed structs in this
    process's memory, ``fcntl.ioctl`` on a real VM fd and ``/dev/sev``.

    Guest RAM is an anonymous mapping seeded from the RAM store; the guest's own CPU accesses
    and fault injection do not exist here. Round trips are counted as issued; firmware calls and DBG bytes
    from the kernel's split rule (the PSP is opaque); multi-command launch steps are not counted.
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
        self._bufs: dict[int, mmap.mmap] = {}
        self._maps: list[mmap.mmap] = []

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        """One real ioctl (one round trip). A successful DBG_DECRYPT/ENCRYPT is also counted in firmware calls
        and bytes by the kernel's own split rule (:mod:`sevmon.sev.dbgsplit`), since the PSP is not visible."""
        self.stats.round_trips += 1
        r = _libc_ioctl(fd, request, arg)
        if request == KVM_MEMORY_ENCRYPT_OP and fd == self.vm_fd and arg:
            self._count(arg)
        elif request == SEV_ISSUE_CMD:
            self.stats.firmware_calls += 1
        return r

    def _count(self, arg: int) -> None:
        cmd = KvmSevCmd.parse(self.read(arg, KvmSevCmd.sizeof()))
        if cmd.id in (SevCmdId.DBG_DECRYPT, SevCmdId.DBG_ENCRYPT) and cmd.data:
            d = KvmSevDbg.parse(self.read(cmd.data, KvmSevDbg.sizeof()))
            calls, dec, enc = classic_dbg_cost(d.src_uaddr, d.dst_uaddr, d.len,
                                               encrypt=cmd.id == SevCmdId.DBG_ENCRYPT)
            self.stats.firmware_calls += calls
            self.stats.bytes_decrypted += dec
            self.stats.bytes_encrypted += enc
        elif cmd.id in _ONE_COMMAND:
            self.stats.firmware_calls += 1

    def alloc(self, n: int) -> int:
        """A zeroed, page-aligned buffer (an anonymous mmap), never ``ctypes.create_string_buffer``: that one is
        16-byte aligned only, and a DBG destination that is not at its source's page offset lets the classic
        kernel's PSP write past the pinned page into the next physical page (sev-api.md §2.1 bug (c))."""
        m = mmap.mmap(-1, max(n, 1) + (-max(n, 1) % PAGE_SIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = _address(m)
        self._bufs[addr] = m
        return addr

    def free(self, hva: int) -> None:
        m = self._bufs.pop(hva, None)
        if m is not None:
            m.close()

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
        return _address(m)

    def cpuid(self) -> SevCpuid:
        return host_cpuid()

    def guest_store(self, gpa: int, data: bytes, *, c_bit: bool = True) -> None:
        raise SevUnavailable("the guest's own CPU accesses exist only in the simulation")

    def guest_load(self, gpa: int, n: int, *, c_bit: bool = True) -> bytes:
        raise SevUnavailable("the guest's own CPU accesses exist only in the simulation")

    def create_vcpu(self, save_area: bytes) -> int:
        raise SevUnavailable("sevmon creates no vCPUs on real KVM, so it cannot launch an SEV-ES guest there "
                             "(LAUNCH_UPDATE_VMSA encrypts the vCPUs' state)")

    def close(self) -> None:
        for m in self._bufs.values():
            m.close()
        self._bufs.clear()
        if self._own_vm:
            os.close(self.vm_fd)
        os.close(self.sev_fd)
