"""A simulated VMM process's memory, as the kernel sees it: its virtual mappings and the pinning of user pages.

Three address spaces meet here: the process's virtual addresses (guest RAM mapped at
:data:`~sevmon.model.sim_host.GUEST_HVA_BASE`, a heap for the VMM's buffers), host physical memory (where the PSP
reads and writes) and guest physical addresses. ``copy_{from,to}_user`` are :meth:`ProcessMemory.uread` and
:meth:`ProcessMemory.uwrite`; ``sev_pin_memory`` is :meth:`ProcessMemory.pin`, charged against RLIMIT_MEMLOCK.

A guest frame absent from the sparse RAM store is a hole in the VMM's mapping: pinning it fails, and Linux's
``sev_pin_memory`` turns any pin failure into ``-ENOMEM``.
"""

from __future__ import annotations

import errno as E
import threading

from sevmon.memory.ram import RAM
from sevmon.sev.abi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, SEV_FW_BLOB_MAX_SIZE

from .hostmem import Extents
from .sim_host import GUEST_HVA_BASE, HEAP_HVA_BASE, KernelError, SimulatedHost

_U64 = (1 << 64) - 1


class ProcessMemory:
    """The address space of one VMM process on a simulated host."""

    def __init__(self, host: SimulatedHost, *, memlock_limit: int | None = None):
        """``memlock_limit``: RLIMIT_MEMLOCK in bytes; None models CAP_IPC_LOCK (no limit)."""
        self.host = host
        self.memlock_limit = memlock_limit
        self.pages_locked = 0
        self.ram: RAM | None = None
        self.guest_hpa = 0  # host physical address of guest physical 0
        self._shared = False  # the RAM mapping is another process's shared backend (not ours to free)
        self._heap = Extents(HEAP_HVA_BASE, GUEST_HVA_BASE)  # hva -> (bytearray, [hpa of each page])
        self._heap_lock = threading.Lock()  # the VMM's malloc

    # -- what the VMM does in its own address space -------------------------------------------
    def alloc(self, n: int) -> int:
        """malloc (page-granular, page-aligned): a zeroed user buffer; returns its address (HVA).
        Each of its pages gets its own host physical page (not contiguous, see ``SimulatedHost.user_page``)."""
        buf = bytearray((max(n, 1) + PAGE_SIZE - 1) & PAGE_MASK)
        mv = memoryview(buf)
        hpas = [self.host.user_page(mv[i:i + PAGE_SIZE]) for i in range(0, len(buf), PAGE_SIZE)]
        with self._heap_lock:
            return self._heap.alloc(len(buf), (buf, hpas))

    def free(self, hva: int) -> None:
        with self._heap_lock:
            buf, hpas = self._heap.remove(hva)
        for hpa in hpas:
            self.host.user_page_free(hpa)

    def read(self, hva: int, n: int) -> bytes:
        """Load ``n`` bytes of the process's memory (guest RAM reads back at rest)."""
        return self.uread(hva, n)

    def write(self, hva: int, data: bytes) -> None:
        """Store into the process's memory. A store into the guest RAM mapping faults the
        frames in (creates them), like touching anonymous memory."""
        if self.ram is not None and GUEST_HVA_BASE <= hva and hva + len(data) <= GUEST_HVA_BASE + self.ram.size:
            self.ram.write(hva - GUEST_HVA_BASE, data)
            return
        self.uwrite(hva, data)

    def map_guest_ram(self, ram: RAM) -> int:
        """mmap the guest's RAM into the process (as QEMU does for each RAM block); its pages
        get a fixed host physical home. Returns the HVA of guest physical address 0."""
        if self.ram is not None:
            raise RuntimeError("guest RAM is already mapped in this process")
        self.guest_hpa = self.host.map_guest_slot(ram)
        self.ram = ram
        return GUEST_HVA_BASE

    def map_shared_ram(self, ram: RAM, hpa: int) -> int:
        """mmap another process's shared RAM backend (a memfd or a /dev/shm file): the same host physical
        pages, now also at this process's GUEST_HVA_BASE. Returns that HVA."""
        if self.ram is not None:
            raise RuntimeError("guest RAM is already mapped in this process")
        self.ram, self.guest_hpa, self._shared = ram, hpa, True
        return GUEST_HVA_BASE

    def release(self) -> None:
        """The process exits: its guest RAM mapping and heap go away."""
        if self.ram is not None and not self._shared:
            self.host.dram.unmap(self.guest_hpa)
        for hva in list(self._heap._bases):
            self.free(hva)
        self.pages_locked = 0

    # -- copy_{from,to}_user ----------------------------------------------------------------------
    def translate(self, hva: int) -> tuple[bytearray | None, int, int] | None:
        """(bytearray or None for guest RAM, offset/hpa, bytes valid from here)."""
        if self.ram is not None and GUEST_HVA_BASE <= hva < GUEST_HVA_BASE + self.ram.size:
            gpa = hva - GUEST_HVA_BASE
            if not self.ram.has(gpa >> PAGE_SHIFT):
                return None
            return None, self.guest_hpa + gpa, PAGE_SIZE - (gpa & (PAGE_SIZE - 1))
        hit = self._heap.find(hva)
        if hit is None:
            return None
        base, size, (buf, _) = hit
        return buf, hva - base, base + size - hva

    def uread(self, hva: int, n: int) -> bytes:
        t = self.translate(hva)
        if t is not None and t[2] >= n:  # the common case: one mapping, one copy
            buf, off, _ = t
            return bytes(memoryview(buf)[off:off + n]) if buf is not None else bytes(self.host.dram.read(off, n))
        out = bytearray()
        while n > 0:
            t = self.translate(hva)
            if t is None:
                raise KernelError(E.EFAULT)
            buf, off, avail = t
            take = min(n, avail)
            out += buf[off:off + take] if buf is not None else self.host.dram.read(off, take)
            hva += take
            n -= take
        return bytes(out)

    def uwrite(self, hva: int, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            t = self.translate(hva)
            if t is None:
                raise KernelError(E.EFAULT)
            buf, off, avail = t
            take = min(len(mv), avail)
            if buf is not None:
                buf[off:off + take] = mv[:take]
            else:
                self.host.dram.write(off, mv[:take])
            hva += take
            mv = mv[take:]

    def copy_user_blob(self, uaddr: int, n: int) -> int:
        """``psp_copy_user_blob``: a kernel copy of a user blob, for the PSP to read; returns its hpa."""
        if not uaddr or n > SEV_FW_BLOB_MAX_SIZE:
            raise KernelError(E.EINVAL)
        data = self.uread(uaddr, n)
        hpa, buf = self.host.kalloc(n)
        buf[:n] = data
        return hpa

    # -- pinning -----------------------------------------------------------------------------------
    def page_hpa(self, hva: int) -> int | None:
        t = self.translate(hva)
        if t is None:
            return None
        buf, off, _ = t
        if buf is None:
            return off
        return self._heap.find(hva)[2][1][off >> PAGE_SHIFT] + (off & (PAGE_SIZE - 1))

    def pin(self, uaddr: int, ulen: int) -> list[int]:
        """``sev_pin_memory``: host physical addresses of the pages of ``[uaddr, uaddr+ulen)``."""
        if ulen == 0 or uaddr + ulen > _U64:
            raise KernelError(E.EINVAL)
        first, last = uaddr >> PAGE_SHIFT, (uaddr + ulen - 1) >> PAGE_SHIFT
        npages = last - first + 1
        self.charge(npages)
        pages = []
        for pfn in range(first, last + 1):
            hpa = self.page_hpa(pfn << PAGE_SHIFT)
            if hpa is None:  # pin_user_pages_fast fell short: sev_pin_memory says -ENOMEM
                raise KernelError(E.ENOMEM)
            pages.append(hpa)
        self.pages_locked += npages
        return pages

    def charge(self, npages: int) -> None:
        """RLIMIT_MEMLOCK: ENOMEM if ``npages`` more would exceed it."""
        if self.memlock_limit is not None and self.pages_locked + npages > self.memlock_limit >> PAGE_SHIFT:
            raise KernelError(E.ENOMEM)

    def unpin(self, pages: list[int]) -> None:
        self.pages_locked -= len(pages)

    def pin_page(self, hva: int) -> int | None:
        """Pin one page for the duration of a chunk (memlock is checked; nothing stays held)."""
        self.charge(2)
        return self.page_hpa(hva)

    def contiguous(self, hva: int, n: int) -> int | None:
        """The host physical address of ``[hva, hva+n)`` if all of it is pinnable and
        physically contiguous (one guest RAM window, or heap pages that happen to be), else None."""
        if self.ram is not None and GUEST_HVA_BASE <= hva and hva + n <= GUEST_HVA_BASE + self.ram.size:
            gpa = hva - GUEST_HVA_BASE
            has = self.ram.has
            if all(has(p) for p in range(gpa >> PAGE_SHIFT, ((gpa + n - 1) >> PAGE_SHIFT) + 1)):
                return self.guest_hpa + gpa
            return None
        hit = self._heap.find(hva)
        if hit is not None and hva + n <= hit[0] + hit[1]:
            hpas = hit[2][1]
            first, last = (hva - hit[0]) >> PAGE_SHIFT, (hva + n - 1 - hit[0]) >> PAGE_SHIFT
            if all(hpas[i] == hpas[first] + (i - first) * PAGE_SIZE for i in range(first + 1, last + 1)):
                return hpas[first] + ((hva - hit[0]) & (PAGE_SIZE - 1))
        return None
