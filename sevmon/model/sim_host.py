"""The simulated host: DRAM, the memory controller, the PSP, and KVM's global SEV state (ASIDs, fds, pages).

One :class:`SimulatedHost` is one machine; every simulated VMM process and VM on it shares its PSP, its ASID
bitmaps and its physical memory (:class:`~sevmon.model.hostmem.HostMemory`). Its locks are the kernel's:
``sev_cmd_mutex`` (one PSP command at a time), ``sev_bitmap_lock`` and the page allocator.
"""

from __future__ import annotations

import errno as E
import threading

from sevmon.memory.ram import RAM
from sevmon.sev.abi import PAGE_SHIFT, SEV_INIT_FLAGS_SEV_ES, FwCmd, SevDataInit
from sevmon.sev.cpuid import SEV, SEV_ES, SME, VM_PAGE_FLUSH, SevCpuid

from .engine import MemoryController
from .firmware import SevFirmware
from .hostmem import Extents, HostMemory

# Process virtual layout (x86-64 user space) and host physical zones.
GUEST_HVA_BASE = 0x7F00_0000_0000
HEAP_HVA_BASE = 0x5555_0000_0000
KERNEL_HPA_BASE = 0x0010_0000          # bounce pages and kernel copies of user blobs
USER_HPA_BASE = 0x0001_0000_0000       # pages backing the VMMs' heaps
GUEST_HPA_SPACING = 1 << 42            # guest RAM of VM slot k lives at (k + 1) << 42


class KernelError(Exception):
    """A negative errno travelling up from deep inside an ioctl handler."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class SimulatedHost:
    """One machine: DRAM, the memory controller, the PSP, and KVM's global SEV state.

    Construction plays the ccp driver's probe (platform INIT, then WBINVD + DF_FLUSH), so the
    platform is INIT and every ASID clean, as on a booted host.
    """

    def __init__(self, *, cbitpos: int = 47, reduced_phys_bits: int = 1, max_asid: int = 509,
                 min_asid: int = 1, sev_enabled: bool = True, sev_es: bool = False):
        """``sev_es``: the CPU has SEV-ES (CPUID 0x8000001F EAX bit 3); KVM enables it only when ``min_asid`` > 1
        leaves ASIDs for it. The ccp driver then INITs the platform with CONFIG.ES (Linux allocates the SEV-ES
        TMR and sets ``SEV_INIT_FLAGS_SEV_ES``)."""
        features = SME | SEV | VM_PAGE_FLUSH | (SEV_ES if sev_es else 0)
        self.cpuid = SevCpuid.make(cbitpos=cbitpos, reduced_phys_bits=reduced_phys_bits,
                                   max_asid=max_asid, min_asid=min_asid, features=features)
        self.sev_enabled = sev_enabled
        self.dram = HostMemory()
        self.mc = MemoryController(self.dram)
        self.psp = SevFirmware(self.mc, max_asid=max_asid)
        self.psp.call(FwCmd.INIT, bytearray(SevDataInit.build({"flags": SEV_INIT_FLAGS_SEV_ES if sev_es else 0})))
        self.psp.call(FwCmd.DF_FLUSH)
        self._kernel_phys = Extents(KERNEL_HPA_BASE, USER_HPA_BASE)
        self._asid_used: set[int] = set()      # KVM sev_asid_bitmap
        self._asid_reclaim: set[int] = set()   # KVM sev_reclaim_asid_bitmap
        self._vm_slots = 0
        self._next_fd = 3
        self._next_user_pfn = (GUEST_HPA_SPACING >> PAGE_SHIFT) - 1  # user pages are handed out top down
        self._free_user_pfns: list[int] = []
        self.tasks: dict = {}                 # pid -> sim_task.Task
        self._next_pid = 1000
        self._psp_lock = threading.Lock()     # sev_cmd_mutex: one PSP command at a time, system-wide
        self._bitmap_lock = threading.Lock()  # sev_bitmap_lock
        self._phys_lock = threading.Lock()    # the page allocator
        #: (destination user address, bytes) of every DBG command the classic kernel let write past the page it
        #: pinned (sevmon.sev.dbgsplit.classic_overruns): on a real host, corruption of an unrelated page
        self.dbg_overruns: list[tuple[int, int]] = []

    @property
    def sev_es_enabled(self) -> bool:
        """KVM enables SEV-ES only when ASIDs below min_sev_asid exist."""
        return self.cpuid.min_sev_asid > 1 and self.cpuid.sev_es

    # physical allocation -----------------------------------------------------------------
    def kalloc(self, n: int) -> tuple[int, bytearray]:
        """A zeroed, physically contiguous kernel buffer (alloc_page / kzalloc)."""
        buf = bytearray(max(n, 1))
        with self._phys_lock:
            base = self._kernel_phys.alloc(len(buf), buf)
            self.dram.map(base, buf)
        return base, buf

    def kfree(self, base: int) -> None:
        with self._phys_lock:
            self._kernel_phys.remove(base)
            self.dram.unmap(base)

    def user_page(self, page: memoryview) -> int:
        """Give one page of a process's buffer its own host physical page; returns its address.

        As the page allocator does, consecutive virtual pages do *not* get consecutive physical pages:
        pages are handed out top down (and freed ones reused first), so the physical page after any user
        page belongs to whoever was given it earlier, often another process. That is what makes Linux's
        classic ``sev_dbg_crypt`` bug (c) (sev-api.md §2.1) corrupt someone else's memory in the model.
        """
        with self._phys_lock:
            if self._free_user_pfns:
                pfn = self._free_user_pfns.pop()
            else:
                pfn = self._next_user_pfn
                if pfn << PAGE_SHIFT < USER_HPA_BASE:
                    raise MemoryError("simulated user memory exhausted")
                self._next_user_pfn -= 1
            self.dram.map(pfn << PAGE_SHIFT, page)
        return pfn << PAGE_SHIFT

    def user_page_free(self, hpa: int) -> None:
        with self._phys_lock:
            self.dram.unmap(hpa)
            self._free_user_pfns.append(hpa >> PAGE_SHIFT)

    def new_pid(self) -> int:
        with self._phys_lock:
            self._next_pid += 1
            return self._next_pid

    def new_fd(self) -> int:
        with self._phys_lock:
            self._next_fd += 1
            return self._next_fd

    def map_guest_slot(self, ram: RAM) -> int:
        """Give a VM's guest RAM a fixed host physical home; returns its base."""
        if ram.size > GUEST_HPA_SPACING:
            raise ValueError("guest RAM larger than 4 TiB is not supported by the simulated host")
        with self._phys_lock:
            self._vm_slots += 1
            base = self._vm_slots * GUEST_HPA_SPACING
        self.dram.map(base, ram, ram.size)
        return base

    # the PSP (sev_cmd_mutex: one command at a time, system-wide) -------------------------
    @property
    def platform_state(self) -> int:
        return self.psp.state

    def psp_call(self, fwcmd: int, buf: bytearray) -> int:
        """One PSP command; returns its status."""
        with self._psp_lock:
            return self.psp.call(fwcmd, buf)

    def psp_count_failed(self) -> None:
        """A command that fault injection failed before the PSP ran it still counts as issued."""
        with self._psp_lock:
            self.psp.commands += 1

    def psp_dbg_crypt(self, **kwargs) -> int:
        with self._psp_lock:
            return self.psp.dbg_crypt(**kwargs)

    # ASIDs (sev_asid_bitmap / sev_reclaim_asid_bitmap) -----------------------------------
    def asid_take(self, lo: int, hi: int, flush) -> int:
        """The lowest free ASID in ``[lo, hi]``; when none is free but some await reclaim, ``flush()`` (DF_FLUSH,
        True on success) recycles them once. KernelError(EBUSY) when none can be had."""
        with self._bitmap_lock:
            used = self._asid_used
            for retry in (True, False):
                asid = next((a for a in range(lo, hi + 1) if a not in used), None)
                if asid is not None:
                    used.add(asid)
                    return asid
                reclaim = self._asid_reclaim
                if retry and reclaim:  # sev_flush_asids: WBINVD + DF_FLUSH, then recycle
                    if not flush():
                        break
                    used -= reclaim
                    reclaim.clear()
        raise KernelError(E.EBUSY)

    def asid_release(self, asid: int) -> None:
        """An ASID whose guest is gone: reusable after the next DF_FLUSH."""
        with self._bitmap_lock:
            self._asid_reclaim.add(asid)
