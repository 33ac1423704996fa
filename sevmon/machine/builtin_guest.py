"""The built-in guest: a small Linux-like x86 guest that sevmon can run anywhere.

Launch first (SEV: LAUNCH_UPDATE_DATA over the firmware, measured), then the guest
"boots": it builds its own page tables and data through its own key (``guest_write``,
the memory controller path — never the debug API), in a Linux-like layout:

- user mappings in 4 KiB pages (program text at 0x400000 / 0x08048000, a stack);
- kernel text in 2 MiB pages (4 MiB PSE pages in 32-bit mode), a direct map of RAM in
  1 GiB pages (64-bit modes);
- vmalloc-style 4 KiB mappings whose table pages are scattered in physical memory;
- one shared page (C-bit clear, like a swiotlb buffer) in the 64-bit modes.

While running, ``Workload.step`` maps and unmaps a user page and rewrites a data page,
so a monitor that served stale cached data would show it.
"""

from __future__ import annotations

import random

from sevmon.machine.cpu import CpuState
from sevmon.machine.ovmf_table import parse_ovmf_table
from sevmon.machine.pflash import FOUR_GIB, FlashError, isa_bios_copy, map_flash
from sevmon.machine.ram import PAGE_SIZE, RAM
from sevmon.machine.vm import Machine, MachineConfig
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

FIRMWARE_SIZE = 64 * 1024
KERNEL_PA = 0x1000000
WORKLOAD_VA = {"4": 0x600000, "5": 0x600000, "pae": 0x08600000, "32": 0x08600000}


def builtin_firmware() -> bytes:
    """A deterministic 64 KiB firmware image (what --bios replaces), 16-byte aligned."""
    block = b"sevmon built-in firmware v1\x00".ljust(64, b"\xcc")
    return (block * (FIRMWARE_SIZE // len(block)))[:FIRMWARE_SIZE]


class GuestOS:
    """Builds and mutates the guest's page tables through the guest's own writes."""

    def __init__(self, ram: RAM, write, cbit: int, paging: str, seed: int = 0x5E7, mem_top: int | None = None):
        self.ram, self.write, self.cbit, self.paging = ram, write, cbit, paging
        self.mem_top = ram.size if mem_top is None else mem_top  # RAM below the flash (--pflash)
        self.rng = random.Random(seed)
        self.wide = paging != "32"               # 8-byte entries
        self.esize = 8 if self.wide else 4
        self.top = 1 << 52 if self.wide else 1 << 32
        lo, hi = KERNEL_PA + (8 << 20), self.mem_top - FIRMWARE_SIZE - (1 << 20)
        self.free = list(range(lo >> 12, hi >> 12))
        self.rng.shuffle(self.free)              # tables and pages land scattered, as in Linux
        self.tables: dict[int, list[int]] = {}   # frame -> entries (the guest's own view)

    # -- physical pages ----------------------------------------------------------------------
    def alloc(self) -> int:
        return self.free.pop() << 12

    def new_table(self) -> int:
        pa = self.alloc()
        self.tables[pa] = [0] * (512 if self.wide else 1024)
        self.write(pa, bytes(PAGE_SIZE))
        return pa

    def set_entry(self, table: int, index: int, value: int) -> None:
        self.tables[table][index] = value
        self.write(table + index * self.esize, value.to_bytes(self.esize, "little"))

    def enc(self, flags: int, private: bool = True) -> int:
        return flags | (self.cbit if private and self.wide else 0)

    # -- mapping -----------------------------------------------------------------------------
    def levels(self) -> list[tuple[int, int]]:
        """(shift, index bits) from the root down to the 4 KiB level."""
        return {"5": [(48, 9), (39, 9), (30, 9), (21, 9), (12, 9)], "4": [(39, 9), (30, 9), (21, 9), (12, 9)],
                "pae": [(30, 2), (21, 9), (12, 9)], "32": [(22, 10), (12, 10)]}[self.paging]

    def map(self, va: int, pa: int, flags: int, size: int = PAGE_SIZE, private: bool = True) -> None:
        table = self.root
        for shift, bits in self.levels():
            idx = (va >> shift) & ((1 << bits) - 1)
            if 1 << shift == size:
                leaf = pa | flags | (PS if size > PAGE_SIZE else 0)
                self.set_entry(table, idx, self.enc(leaf, private))
                return
            entry = self.tables[table][idx]
            if not entry & P:
                child = self.new_table()
                pae_root = self.paging == "pae" and shift == 30
                self.set_entry(table, idx, self.enc(child | (P if pae_root else TABLE)))
                entry = self.tables[table][idx]
            table = entry & ~self.cbit & PG_ADDRESS_MASK

    def unmap(self, va: int) -> None:
        table = self.root
        for shift, bits in self.levels():
            idx = (va >> shift) & ((1 << bits) - 1)
            if shift == 12:
                self.set_entry(table, idx, 0)
                return
            entry = self.tables[table][idx]
            if not entry & P:
                return
            table = entry & ~self.cbit & PG_ADDRESS_MASK

    def data_page(self, text: str, private: bool = True) -> int:
        pa = self.alloc()
        self.write(pa, text.encode().ljust(PAGE_SIZE, b"\0"), private)
        return pa

    # -- boot ----------------------------------------------------------------------------------
    def boot(self) -> CpuState:
        mode = self.paging
        if mode == "pae":
            self.root = self.alloc()  # the 32-byte PDPT lives at the start of a page
            self.tables[self.root] = [0] * 512
            self.write(self.root, bytes(PAGE_SIZE))
        else:
            self.root = self.new_table()
        nx = NX if self.wide else 0
        if mode in ("4", "5"):
            user, stack = 0x400000, 0x7FFFFFFDE000
            kernel_va = 0xFFFFFFFF81000000
            direct = 0xFF11000000000000 if mode == "5" else 0xFFFF888000000000
            vmalloc = 0xFFFFC90000000000
        else:
            user, stack, kernel_va, direct, vmalloc = 0x08048000, 0xBFFDE000, 0xC0000000, None, 0xF8000000
        # kernel text: 4 MiB as 2 MiB pages (4 MiB PSE page in 32-bit mode)
        ksize = 4 << 20 if mode == "32" else 2 << 20
        for off in range(0, 4 << 20, ksize):
            self.map(kernel_va + off, KERNEL_PA + off, P | A | D | G, ksize)
        # the whole kernel image is resident (x $rip works), each page tagged for tests
        self.write(KERNEL_PA, b"".join(f"kernel text +{off:#x}".encode().ljust(PAGE_SIZE, b"\x90")
                                       for off in range(0, 4 << 20, PAGE_SIZE)))
        if direct is not None:  # direct map of RAM in 1 GiB pages, as Linux does when it can
            for off in range(0, self.mem_top, 1 << 30):
                self.map(direct + off, off, P | RW | A | D | G | nx, 1 << 30)
        for i in range(32):     # program text and data, 4 KiB, read-only text then rw data
            flags = P | US | A | (0 if i < 16 else RW | D | nx)
            self.map(user + i * PAGE_SIZE, self.data_page(f"user page {i}"), flags)
        for i in range(8):
            self.map(stack + i * PAGE_SIZE, self.data_page(f"stack page {i}"), P | RW | US | A | D | nx)
        for i in range(24):     # vmalloc: sparse, each 1 MiB apart -> many scattered tables
            self.map(vmalloc + i * (1 << 21), self.data_page(f"vmalloc page {i}"), P | RW | A | D | G | nx)
        if self.wide and self.cbit:
            shared = self.data_page("shared (unencrypted) bounce buffer", private=False)
            self.map(vmalloc + (64 << 21), shared, P | RW | A | D | G | nx, private=False)
        return self.cpu(kernel_va, stack)

    def cpu(self, kernel_va: int, stack: int) -> CpuState:
        mode = self.paging
        cr4 = {"5": 0x3406E0 | 1 << 12, "4": 0x3406E0, "pae": 0x3406F0, "32": 0x340690}[mode]
        efer = 0xD01 if mode in ("4", "5") else (0x800 if mode == "pae" else 0)
        cr3 = self.root | (self.cbit if mode in ("4", "5") else 0)
        return CpuState(0, {"cr0": 0x80050033, "cr3": cr3, "cr4": cr4, "efer": efer, "rip": kernel_va + 0x1000,
                            "rsp": stack + 7 * PAGE_SIZE + 0xF00, "rflags": 0x246, "cs": 0x10, "ss": 0x18})


class Workload:
    """Guest activity between monitor commands: map/unmap a page, rewrite a data page."""

    def __init__(self, guest: GuestOS, va: int):
        self.guest, self.va, self.ticks = guest, va, 0
        self.page = guest.alloc()

    def step(self) -> None:
        self.ticks += 1
        g = self.guest
        g.write(self.page, f"tick {self.ticks}".encode().ljust(64, b"\0"))
        if self.ticks % 2:
            g.map(self.va, self.page, P | RW | US | A | D)
        else:
            g.unmap(self.va)

    def reset(self) -> None:
        self.guest.unmap(self.va)
        self.ticks = 0


def _firmware_images(args, mem_top: int) -> tuple[list, list, dict]:
    """(measured images, plain images, OVMF table) as QEMU loads firmware: pflash unit 0
    (measured as a whole, ending at 4 GiB; ``--bios`` then unused) and plain later units, or
    else the BIOS (``--bios`` or the built-in image) at the top of RAM, measured."""
    if args.pflash:
        units = map_flash(args.pflash)
        if mem_top > units[-1].gpa:
            raise FlashError(f"--memory {args.memory} overlaps the system flash mapped at "
                             f"{units[-1].gpa:#x}: at most {units[-1].gpa >> 20} MiB with these --pflash files")
        ovmf = parse_ovmf_table(units[0].data)  # before launch, where QEMU parses it
        plain = [isa_bios_copy(units[0])] + [(u.gpa, u.data) for u in units[1:]]
        return [(units[0].gpa, units[0].data)], plain, ovmf
    firmware = open(args.bios, "rb").read() if args.bios else builtin_firmware()
    firmware = firmware + bytes(-len(firmware) % 16)
    return [((mem_top - len(firmware)) & ~(PAGE_SIZE - 1), firmware)], [], {}


def build_builtin(args) -> Machine:
    mem_top = args.memory << 20
    measured, plain, ovmf = _firmware_images(args, mem_top)
    ram = RAM(mem_top if not args.pflash else FOUR_GIB)
    sev = None
    if args.sev is not False:
        from sevmon.machine.builder import _sev_kernel
        from sevmon.sev.owner_files import owner_launch_files
        from sevmon.sev.vm import SevVm
        sev = SevVm(ram, policy=args.policy, cbitpos=args.cbitpos, reduced_phys_bits=args.reduced_phys_bits,
                    kernel=_sev_kernel(args), **owner_launch_files(args))
        for gpa, blob in plain:
            ram.write(gpa, blob)
        sev.launch(measured)
        guest = GuestOS(ram, sev.guest_write, sev.me_mask, args.paging, mem_top=mem_top)
    else:
        for gpa, blob in [*measured, *plain]:
            ram.write(gpa, blob)
        guest = GuestOS(ram, lambda gpa, data, private=True: ram.write(gpa, data), 0, args.paging, mem_top=mem_top)
    config = MachineConfig(kvm_enabled=sev is not None, source="builtin", debug_policy=args.debug_policy == "on")
    config.extra["ovmf-table"] = ovmf
    # Under -S the vCPU sits at the reset vector (paging off) and the launch is not finished.
    cpu = CpuState(0, {"cr0": 0x60000010, "rip": 0xFFF0, "cs": 0xF000, "cs_base": 0xFFFF0000})
    machine = Machine(ram, [cpu], config=config, sev=sev, running=not args.prelaunch, prelaunch=args.prelaunch)
    machine.guest = guest

    def first_run() -> None:
        """LAUNCH_FINISH, then the guest boots: builds its tables through its own key."""
        if sev is not None:
            sev.finish()
        cpu.regs = guest.boot().regs
        if args.workload:
            machine.workload = Workload(guest, WORKLOAD_VA[args.paging])

    if args.prelaunch:
        machine.first_run = first_run
    else:
        first_run()
    return machine
