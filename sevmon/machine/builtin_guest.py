"""The built-in guest: a small Linux-like x86 guest that sevmon can run anywhere.

Launch first (SEV: LAUNCH_UPDATE_DATA over the firmware, measured), then the guest
"boots": it builds its own page tables and data through its own key (``guest_write``,
the memory controller path — never the debug API), in a Linux-like layout:

- user mappings in 4 KiB pages (program text at 0x400000 / 0x08048000, a stack);
- kernel text in 2 MiB pages (4 MiB PSE pages in 32-bit mode), a direct map of RAM in
  1 GiB pages (64-bit modes);
- vmalloc-style 4 KiB mappings whose table pages are scattered in physical memory;
- on SEV, one shared page (C-bit clear, like a swiotlb buffer); 32-bit legacy entries have no C-bit, so there it is
  mapped like any other page;
- in 64-bit modes, the kernel's own top table (``init_top_pgt``: the kernel half of the process's) and a VMCOREINFO
  page as Linux keeps one (``OSRELEASE=`` first, ``SYMBOL(init_top_pgt)``, ``NUMBER(phys_base)``...), low in RAM, so that sevmon finds its page tables without its registers
  as it finds a real Linux guest's (:mod:`sevmon.x86.vmcoreinfo`).

While running, ``GuestOS.step`` (the workload) maps and unmaps a user page and rewrites a data page,
so a monitor that served stale cached data would show it.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from sevmon.machine.interface import MachineConfig
from sevmon.machine.launch import es_vmsas, launch_sev
from sevmon.machine.local import LocalMachine
from sevmon.machine.ovmf_table import parse_ovmf_table
from sevmon.machine.pflash import FOUR_GIB, ISA_BIOS_MAX, FlashError, isa_bios_copy, map_flash
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, RAM
from sevmon.x86.cpu import CpuState
from sevmon.x86.modes import MODES, PagingMode
from sevmon.x86.pte import PG_ACCESSED as A
from sevmon.x86.pte import PG_ADDRESS_MASK
from sevmon.x86.pte import PG_DIRTY as D
from sevmon.x86.pte import PG_GLOBAL as G
from sevmon.x86.pte import PG_NX as NX
from sevmon.x86.pte import PG_PRESENT as P
from sevmon.x86.pte import PG_PSE as PS
from sevmon.x86.pte import PG_RW as RW
from sevmon.x86.pte import PG_USER as US
from sevmon.x86.pte import TABLE_FLAGS as TABLE
from sevmon.x86.vmcoreinfo import START_KERNEL_MAP

FIRMWARE_SIZE = 64 * 1024
KERNEL_PA = 0x1000000
#: The built-in guest's VMCOREINFO page: just above its 4 MiB kernel image (a Debian 6.1 guest's is near 19 MiB).
VMCOREINFO_PA = KERNEL_PA + (4 << 20)
#: Its kernel's ``uname -r``.
RELEASE = "6.1.0-sevmon-builtin"
#: The least RAM the built-in guest boots in: its kernel at 16 MiB, its tables and pages above 24 MiB.
MIN_MEMORY_MIB = 32


@dataclass(frozen=True)
class Layout:
    """Where the guest maps things, as Linux does in each address-space size."""

    user: int        #: program text and data, 4 KiB pages
    stack: int
    kernel: int      #: kernel text, large pages
    direct: int | None  #: direct map of all RAM in 1 GiB pages (64-bit only)
    vmalloc: int     #: sparse 4 KiB mappings, 2 MiB apart
    shared: int      #: the shared (C-bit clear) bounce-buffer page
    workload: int    #: the page the workload maps and unmaps


_LONG = dict(user=0x400000, stack=0x7FFFFFFDE000, kernel=0xFFFFFFFF81000000, vmalloc=0xFFFFC90000000000,
             shared=0xFFFFC90000000000 + (64 << 21), workload=0x600000)
_LEGACY = Layout(user=0x08048000, stack=0xBFFDE000, kernel=0xC0000000, direct=None, vmalloc=0xF8000000,
                 shared=0xF8000000 + (32 << 21), workload=0x08600000)
LAYOUTS: dict[str, Layout] = {
    "4level": Layout(direct=0xFFFF888000000000, **_LONG),
    "5level": Layout(direct=0xFF11000000000000, **_LONG),
    "pae": _LEGACY,
    "32pse": _LEGACY,
}

#: Linux's flat segments: 64-bit kernel CS (L=1), data; 32-bit kernel CS/DS (D/B=1), user DS.
_SEG64 = {"cs": 0x10, "cs_limit": 0xFFFFFFFF, "cs_flags": 0x00AF9B00, "ss": 0x18, "ss_limit": 0xFFFFFFFF,
          "ss_flags": 0x00CF9300}
_SEG32 = {"cs": 0x60, "cs_limit": 0xFFFFFFFF, "cs_flags": 0x00CF9B00, "ss": 0x68, "ss_limit": 0xFFFFFFFF,
          "ss_flags": 0x00CF9300, **{f"{s}{k}": v for s in ("ds", "es") for k, v in
                                     (("", 0x7B), ("_limit", 0xFFFFFFFF), ("_flags", 0x00CFF300))}}


def builtin_firmware() -> bytes:
    """A deterministic 64 KiB firmware image (what --bios replaces), 16-byte aligned."""
    block = b"sevmon built-in firmware v1\x00".ljust(64, b"\xcc")
    return (block * (FIRMWARE_SIZE // len(block)))[:FIRMWARE_SIZE]


class GuestOS:
    """The guest's kernel: builds and mutates its page tables through the guest's own writes.

    It is the machine's :class:`~sevmon.machine.local.GuestProgram`: ``boot`` builds the address space and
    returns the vCPU a booted Linux would have; ``step`` is the workload (when enabled).
    """

    def __init__(self, ram: RAM, write, cbit: int, mode: PagingMode, *, workload: bool = True, seed: int = 0x5E7,
                 mem_top: int | None = None):
        self.ram, self.write, self.mode = ram, write, mode
        self.mem_top = ram.size if mem_top is None else mem_top  # RAM below the flash (--pflash)
        self.sev = cbit != 0                     # an SEV guest keeps one shared (C-bit clear) page
        self.cbit = cbit if mode.wide else 0     # 4-byte entries have no C-bit
        self.layout = LAYOUTS[mode.name]
        self.stepping = workload
        self.rng = random.Random(seed)
        lo, hi = KERNEL_PA + (8 << 20), self.mem_top - FIRMWARE_SIZE - (1 << 20)
        self.free = list(range(lo >> 12, hi >> 12))
        self.rng.shuffle(self.free)              # tables and pages land scattered, as in Linux
        self.tables: dict[int, list[int]] = {}   # frame -> entries (the guest's own view)
        self.ticks = 0
        self.workload_page: int | None = None

    # -- physical pages ----------------------------------------------------------------------
    def alloc(self) -> int:
        return self.free.pop() << 12

    def new_table(self, entries: int = 512) -> int:
        pa = self.alloc()
        self.tables[pa] = [0] * entries
        self.write(pa, bytes(PAGE_SIZE))
        return pa

    def set_entry(self, table: int, index: int, value: int) -> None:
        self.tables[table][index] = value
        esize = self.mode.entry_size
        self.write(table + index * esize, value.to_bytes(esize, "little"))

    def enc(self, flags: int, private: bool = True) -> int:
        return flags | (self.cbit if private else 0)

    # -- mapping -----------------------------------------------------------------------------
    def _indexes(self, va: int):
        """(depth, shift, index) from the root down to the 4 KiB level."""
        for depth, lvl in enumerate(self.mode.levels):
            yield depth, lvl.shift, (va >> lvl.shift) & (lvl.entries - 1)

    def map(self, va: int, pa: int, flags: int, size: int = PAGE_SIZE, private: bool = True) -> None:
        table = self.root
        levels = self.mode.levels
        for depth, shift, idx in self._indexes(va):
            if 1 << shift == size:
                leaf = pa | flags | (PS if size > PAGE_SIZE else 0)
                self.set_entry(table, idx, self.enc(leaf, private))
                return
            entry = self.tables[table][idx]
            if not entry & P:
                child = self.new_table(levels[depth + 1].entries)
                pae_root = self.mode.name == "pae" and depth == 0  # PDPTEs have P only
                self.set_entry(table, idx, self.enc(child | (P if pae_root else TABLE)))
                entry = self.tables[table][idx]
            table = entry & ~self.cbit & PG_ADDRESS_MASK

    def unmap(self, va: int) -> None:
        table = self.root
        for _depth, shift, idx in self._indexes(va):
            if shift == 12:
                self.set_entry(table, idx, 0)
                return
            entry = self.tables[table][idx]
            if not entry & P:
                return
            table = entry & ~self.cbit & PG_ADDRESS_MASK

    def set_memory_decrypted(self, va: int) -> None:
        """Linux's ``set_memory_decrypted`` for the 4 KiB page at ``va``: the large pages that cover it are split
        down to 4 KiB (``split_large_page``: a table of the next level, same flags) and its entry loses the C-bit.
        Without it the direct map would alias the shared page as private."""
        table = self.root
        levels = self.mode.levels
        for depth, shift, idx in self._indexes(va):
            entry = self.tables[table][idx]
            if shift == 12:
                self.set_entry(table, idx, entry & ~self.cbit)
                return
            if entry & PS:
                below = levels[depth + 1]
                base = entry & PG_ADDRESS_MASK & ~((1 << shift) - 1)
                flags = entry & (0xFFF | NX) & ~PS | (PS if below.shift > 12 else 0)
                child = self.alloc()
                entries = [self.enc(base + (i << below.shift) | flags) for i in range(below.entries)]
                self.tables[child] = entries
                self.write(child, struct.pack(f"<{below.entries}Q", *entries))
                self.set_entry(table, idx, self.enc(child | TABLE))
                entry = self.tables[table][idx]
            table = entry & ~self.cbit & PG_ADDRESS_MASK

    def data_page(self, text: str, private: bool = True) -> int:
        """A page of ``text``; ``private=False`` writes it shared where the mode can say so (with 4-byte entries
        every access is private: legacy paging cannot clear a C-bit)."""
        pa = self.alloc()
        self.write(pa, text.encode().ljust(PAGE_SIZE, b"\0"), private or not self.mode.wide)
        return pa

    # -- boot ----------------------------------------------------------------------------------
    def boot(self) -> CpuState:
        mode, lay = self.mode, self.layout
        root_entries = mode.levels[0].entries
        if root_entries < 512:  # the 32-byte PAE PDPT lives at the start of a page
            self.root = self.alloc()
            self.tables[self.root] = [0] * 512
            self.write(self.root, bytes(PAGE_SIZE))
        else:
            self.root = self.new_table(root_entries)
        nx = NX if mode.wide else 0
        # kernel text: 4 MiB as 2 MiB pages (one 4 MiB PSE page in 32-bit mode)
        ksize = 1 << mode.levels[-2].shift
        for off in range(0, 4 << 20, ksize):
            self.map(lay.kernel + off, KERNEL_PA + off, P | A | D | G, ksize)
        # the whole kernel image is resident (x $rip works), each page tagged for tests
        self.write(KERNEL_PA, b"".join(f"kernel text +{off:#x}".encode().ljust(PAGE_SIZE, b"\x90")
                                       for off in range(0, 4 << 20, PAGE_SIZE)))
        if lay.direct is not None:  # direct map of RAM in 1 GiB pages, as Linux does when it can
            for off in range(0, self.mem_top, 1 << 30):
                self.map(lay.direct + off, off, P | RW | A | D | G | nx, 1 << 30)
        for i in range(32):     # program text and data, 4 KiB, read-only text then rw data
            flags = P | US | A | (0 if i < 16 else RW | D | nx)
            self.map(lay.user + i * PAGE_SIZE, self.data_page(f"user page {i}"), flags)
        for i in range(8):
            self.map(lay.stack + i * PAGE_SIZE, self.data_page(f"stack page {i}"), P | RW | US | A | D | nx)
        for i in range(24):     # vmalloc: sparse, each 1 MiB apart -> many scattered tables
            self.map(lay.vmalloc + i * (1 << 21), self.data_page(f"vmalloc page {i}"), P | RW | A | D | G | nx)
        if self.sev:
            shared = self.data_page("shared (unencrypted) bounce buffer", private=False)
            self.map(lay.shared, shared, P | RW | A | D | G | nx, private=False)
            if lay.direct is not None and mode.wide:
                self.set_memory_decrypted(lay.direct + shared)
        self.workload_page = self.alloc()
        if mode.long_mode:
            # Linux's init_top_pgt: the kernel half only; a process's top table (CR3) copies it and adds its user
            # half. Every kernel mapping exists by now and the workload maps user pages only, so the copy stays true.
            self.init_top_pgt = self.new_table()
            half = mode.levels[0].entries // 2
            for i in range(half, mode.levels[0].entries):
                if self.tables[self.root][i]:
                    self.set_entry(self.init_top_pgt, i, self.tables[self.root][i])
            self.write(VMCOREINFO_PA, self.vmcoreinfo().encode().ljust(PAGE_SIZE, b"\0"))
        return self.cpu()

    def vmcoreinfo(self) -> str:
        """The text Linux's ``crash_save_vmcoreinfo`` writes, for this guest: its kernel is not relocated
        (``phys_base`` 0, no KASLR), so ``init_top_pgt`` is seen through ``__START_KERNEL_map``. On x86-64
        ``swapper_pg_dir`` is ``init_top_pgt`` under its generic name, and Linux writes both (the generic symbols
        first, then the arch's): drgn finds the kernel's tables by the first, sevmon by the second."""
        top = START_KERNEL_MAP + self.init_top_pgt
        return (f"OSRELEASE={RELEASE}\nPAGESIZE={PAGE_SIZE}\nSYMBOL(swapper_pg_dir)={top:x}\n"
                f"SYMBOL(init_top_pgt)={top:x}\n"
                f"NUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)={int(self.mode.name == '5level')}\n"
                f"KERNELOFFSET=0\n")

    def cpu(self) -> CpuState:
        """The vCPU of a booted Linux in this mode: control registers, flat segments, in kernel text."""
        mode, lay = self.mode, self.layout
        cr3 = self.root | (self.cbit if mode.long_mode else 0)
        regs = {"cr0": mode.cr0, "cr3": cr3, "cr4": mode.cr4, "efer": mode.efer, "rip": lay.kernel + 0x1000,
                "rsp": lay.stack + 7 * PAGE_SIZE + 0xF00, "rflags": 0x246}
        regs.update(_SEG64 if mode.long_mode else _SEG32)
        return CpuState(0, regs)

    # -- the workload ----------------------------------------------------------------------------
    def step(self) -> None:
        """Guest activity between monitor commands: map/unmap a page, rewrite a data page."""
        self.ticks += 1
        self.write(self.workload_page, f"tick {self.ticks}".encode().ljust(64, b"\0"))
        if self.ticks % 2:
            self.map(self.layout.workload, self.workload_page, P | RW | US | A | D)
        else:
            self.unmap(self.layout.workload)

    def reset(self) -> None:
        self.unmap(self.layout.workload)
        self.ticks = 0


def _firmware_images(spec: GuestSpec, mem_top: int) -> tuple[list, list, dict]:
    """(measured images, plain images, OVMF table) as QEMU loads firmware: pflash unit 0
    (measured as a whole, ending at 4 GiB; ``--bios`` then unused) and plain later units, or
    else the BIOS (``--bios`` or the built-in image) at the top of RAM, measured. Either way the top 128 KiB
    of the firmware is also copied, plain, to end at 1 MiB (QEMU's isa-bios, where the reset vector 0xffff0 is)."""
    if spec.pflash:
        units = map_flash(list(spec.pflash))
        if mem_top > units[-1].gpa:
            raise FlashError(f"--memory {spec.memory_mib} overlaps the system flash mapped at "
                             f"{units[-1].gpa:#x}: at most {units[-1].gpa >> 20} MiB with these --pflash files")
        ovmf = parse_ovmf_table(units[0].data)  # before launch, where QEMU parses it
        plain = [isa_bios_copy(units[0])] + [(u.gpa, u.data) for u in units[1:]]
        return [(units[0].gpa, units[0].data)], plain, ovmf
    firmware = open(spec.bios, "rb").read() if spec.bios else builtin_firmware()
    firmware = firmware + bytes(-len(firmware) % 16)
    n = min(len(firmware), ISA_BIOS_MAX)  # QEMU's isa-bios: the top 128 KiB of the BIOS, a ROM ending at 1 MiB
    return [((mem_top - len(firmware)) & ~(PAGE_SIZE - 1), firmware)], [(0x100000 - n, firmware[-n:])], {}


def build_builtin(spec: GuestSpec, memory_for) -> LocalMachine:
    """The built-in guest of ``spec``; ``memory_for(ram, sev)`` makes its debug-access layer."""
    mem_top = spec.memory_mib << 20
    measured, plain, ovmf = _firmware_images(spec, mem_top)
    ram = RAM(FOUR_GIB if spec.pflash else mem_top, dense_top=mem_top)  # all of --memory is RAM, as in QEMU
    mode = MODES[spec.paging]
    if spec.sev is not None:
        vmsas = es_vmsas(spec.sev, spec.smp, spec.cpu_model, ovmf if spec.pflash else None)
        sev = launch_sev(ram, measured, spec.sev, vmsas)
        ram.blank = lambda pfn: sev.guest_zero_page(pfn << PAGE_SHIFT)
        for gpa, blob in plain:  # later pflash units and the ISA BIOS copy: plain, unmeasured ROMs
            ram.write(gpa, blob)
            ram.rom.append((gpa, len(blob)))
        guest = GuestOS(ram, sev.guest_write, sev.me_mask, mode, workload=spec.workload, mem_top=mem_top)
    else:
        sev = None
        for gpa, blob in [*measured, *plain]:
            ram.write(gpa, blob)
        guest = GuestOS(ram, lambda gpa, data, private=True: ram.write(gpa, data), 0, mode, workload=spec.workload,
                        mem_top=mem_top)
    config = MachineConfig(kvm_enabled=sev is not None, memory_encryption=sev is not None, source="builtin",
                           debug_policy=spec.debug_policy, ovmf_table=ovmf)
    if sev is not None and sev.es:  # their state is in encrypted VMSAs: nothing of it is known, ever
        cpus = [CpuState.encrypted(i) for i in range(spec.smp)]
    else:  # under -S every vCPU sits at the reset vector (paging off) and the launch is not finished
        cpus = [CpuState(i, {"cr0": 0x60000010, "rip": 0xFFF0, "cs": 0xF000, "cs_base": 0xFFFF0000})
                for i in range(spec.smp)]
    return LocalMachine(ram, cpus, memory_for(ram, sev), config=config, sev=sev, program=guest,
                        prelaunch=spec.prelaunch, running=not spec.prelaunch)
