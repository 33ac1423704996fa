"""A Linux guest's VMCOREINFO, found in its RAM through the debug path, and the kernel's own page-table root.

Why: when a vCPU's registers cannot be had (an SEV-ES guest keeps them in its encrypted VMSA; a raw RAM image has
none), there is no CR3 to walk from. A 64-bit Linux kernel tells us where its page tables are: ``crash_save_vmcoreinfo``
fills a page of its own with text that starts ``OSRELEASE=`` and carries ``SYMBOL(init_top_pgt)``,
``NUMBER(phys_base)``, ``KERNELOFFSET`` and ``NUMBER(pgtable_l5_enabled)``. The kernel's root table is then at
``init_top_pgt - __START_KERNEL_map + phys_base``; every process's top table copies its kernel half, so the kernel
half of ``info mem``/``info tlb`` walked from that root is what the vCPU would show.

The same text is what ``crash`` and ``drgn`` need (QEMU's ``-device vmcoreinfo`` note), so :func:`find` and
:class:`GuestKernel` are written to be reused by dumps and live kernel tools.

Cost: the scan goes from guest-physical 0 up, in batched runs of :data:`SCAN_BATCH_PAGES` pages (one request, so one
kernel round trip on SEV, per run; the kernel splits it into one firmware call per page), and stops at the first
page that holds a usable text: at most one firmware call per RAM page, usually far fewer (Linux allocates the page
early, about 19 MiB up on a Debian 6.1 guest). Pages already in the plaintext cache cost nothing, and the scan does
not fill the cache (it must not evict the page tables the walkers just read).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, MemoryAccessError
from sevmon.x86.cpu import CpuState
from sevmon.x86.modes import MODES

HEAD = b"OSRELEASE="
START_KERNEL_MAP = 0xFFFFFFFF80000000  #: x86-64 ``__START_KERNEL_map``: kernel image virtual = this + physical - phys_base
SCAN_BATCH_PAGES = 512                 #: pages per request while scanning (2 MiB)
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class GuestKernel:
    """What a Linux guest's VMCOREINFO says about its kernel, and where the text was found."""

    release: str        #: OSRELEASE (``uname -r``)
    kaslr_offset: int   #: KERNELOFFSET: how far KASLR moved the kernel image
    phys_base: int      #: NUMBER(phys_base)
    root: int           #: guest-physical address of ``init_top_pgt`` (without the C-bit)
    levels: int         #: 4 or 5 (NUMBER(pgtable_l5_enabled))
    gpa: int            #: guest-physical address of the VMCOREINFO page
    text: str           #: the VMCOREINFO text itself, as the kernel wrote it

    def walk_cpu(self, me_mask: int = 0, index: int = 0) -> CpuState:
        """A vCPU as a booted Linux has it, with CR3 at the kernel's root (C-bit set, as Linux's CR3 has it on
        SEV): what the walkers and the translation layer start from when the real vCPU cannot be read."""
        mode = MODES["5level" if self.levels == 5 else "4level"]
        return CpuState(index, {"cr0": mode.cr0, "cr3": self.root | me_mask, "cr4": mode.cr4, "efer": mode.efer})

    def to_qmp(self) -> dict:
        return {"release": self.release, "kaslr-offset": self.kaslr_offset, "phys-base": self.phys_base,
                "root": self.root, "paging-levels": self.levels, "vmcoreinfo-gpa": self.gpa,
                "vmcoreinfo": self.text}


class VmcoreinfoError(ValueError):
    """A page that starts ``OSRELEASE=`` but does not describe a 64-bit x86 kernel we can walk."""


def fields(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``SYMBOL(x)``, ``NUMBER(x)``... stay part of the key); later lines win, as in crash."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _hex(f: dict[str, str], key: str) -> int:
    try:
        return int(f[key], 16)
    except KeyError:
        raise VmcoreinfoError(f"no {key}") from None
    except ValueError:
        raise VmcoreinfoError(f"{key} is not hexadecimal: {f[key]!r}") from None


def _dec(f: dict[str, str], key: str, default: int | None = None) -> int:
    """Linux prints NUMBER() with ``%ld``: decimal, possibly negative (taken modulo 2^64 for addresses)."""
    if key not in f:
        if default is None:
            raise VmcoreinfoError(f"no {key}")
        return default
    try:
        return int(f[key], 10)
    except ValueError:
        raise VmcoreinfoError(f"{key} is not a decimal number: {f[key]!r}") from None


def parse(text: str, gpa: int = 0) -> GuestKernel:
    """The kernel ``text`` describes; VmcoreinfoError (one phrase) when it is not a usable x86-64 VMCOREINFO."""
    f = fields(text)
    release = f.get("OSRELEASE", "").strip()
    if not release:
        raise VmcoreinfoError("no OSRELEASE")
    top = _hex(f, "SYMBOL(init_top_pgt)")
    phys_base = _dec(f, "NUMBER(phys_base)") & _U64
    kaslr = _hex(f, "KERNELOFFSET") if "KERNELOFFSET" in f else 0
    levels = 5 if _dec(f, "NUMBER(pgtable_l5_enabled)", 0) else 4
    if top < START_KERNEL_MAP:
        raise VmcoreinfoError(f"init_top_pgt 0x{top:x} is not in the kernel image")
    root = (top - START_KERNEL_MAP + phys_base) & _U64
    if root & (PAGE_SIZE - 1):
        raise VmcoreinfoError(f"init_top_pgt's physical address 0x{root:x} is not page-aligned")
    return GuestKernel(release, kaslr, phys_base, root, levels, gpa, text)


def page_text(page: bytes) -> str:
    """The text of a VMCOREINFO page: up to the first NUL (the kernel's buffer is a zeroed page)."""
    end = page.find(b"\0")
    return page[:end if end >= 0 else len(page)].decode("ascii", "replace")


@dataclass
class ScanCost:
    """What one discovery cost: pages looked at and requests made (the debug stats give round trips and calls)."""

    pages: int = 0
    requests: int = 0


def find(mem, ram_runs: Iterable[tuple[int, int]], *, batch_pages: int = SCAN_BATCH_PAGES,
         cost: ScanCost | None = None) -> GuestKernel | None:
    """The first usable VMCOREINFO in guest RAM, from low addresses up, or None (no 64-bit Linux found).

    ``mem`` is a :class:`~sevmon.debug.PhysicalMemory` with ``read_frames(pfns, fill=...)`` (the debug layer: each
    batch is one request of contiguous frames); ``ram_runs`` are ``(first frame, count)`` runs of RAM. A page that
    starts ``OSRELEASE=`` but does not parse (a 32-bit kernel, a copy of the text in a buffer) is passed over.
    """
    cost = cost if cost is not None else ScanCost()
    # a frame the guest never wrote (the model's sparse RAM) holds zeros, not the text: no firmware call for it, as
    # a dump skips it (DebugMemory.read_zero_filled), so a guest without Linux costs no more to scan than to dump
    stored = getattr(getattr(mem, "ram", None), "stored", None)
    for first, count in sorted(ram_runs):
        pfn, end = first, first + count
        while pfn < end:
            n = min(batch_pages, end - pfn)
            want = range(pfn, pfn + n) if stored is None else [p for p in range(pfn, pfn + n) if stored(p)]
            try:
                pages = mem.read_frames(want, fill=False) if want else {}
            except TypeError:  # a PhysicalMemory without a cache (plain images before launch)
                pages = mem.read_frames(want)
            cost.requests += 1
            cost.pages += n
            for p in range(pfn, pfn + n):
                page = pages.get(p)
                if page is not None and page.startswith(HEAD):
                    try:
                        return parse(page_text(page), p << PAGE_SHIFT)
                    except VmcoreinfoError:
                        continue
            pfn += n
    return None


class KernelCache:
    """The guest kernel found, kept while the kernel is the same.

    A machine holds one and calls :meth:`forget` on a reset. Between commands the guest may have rebooted on its
    own (a new KASLR offset, another kernel): before a cached answer is used, the page it came from is read again
    (from the plaintext cache when the guest stayed paused: no round trip) and must hold the same text.
    """

    def __init__(self):
        self.kernel: GuestKernel | None = None
        self.scanned = False            #: a scan ran (a miss is kept until :meth:`forget`: reset, resume)
        self.last_cost: ScanCost | None = None

    def forget(self) -> None:
        self.kernel, self.scanned = None, False

    def get(self, mem, ram_runs: Iterable[tuple[int, int]]) -> GuestKernel | None:
        k = self.kernel
        if k is not None:
            try:
                if page_text(mem.read(k.gpa, PAGE_SIZE)) == k.text:
                    return k
            except MemoryAccessError:
                pass
            self.forget()
        elif self.scanned:
            return None  # nothing found since the last reset or resume: the RAM has not changed
        cost = ScanCost()
        self.kernel = find(mem, ram_runs, cost=cost)
        self.last_cost = cost
        self.scanned = True
        if self.kernel is not None:
            mem.read(self.kernel.gpa, PAGE_SIZE)  # keep the page cached: the next check costs no round trip
        return self.kernel
