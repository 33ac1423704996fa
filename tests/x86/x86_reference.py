"""Reference walkers for the tests, written as plainly as possible (one entry = one 4/8-byte RAM read).

* ``naive_tlb`` / ``naive_mem``: QEMU's ``monitor.c`` loops transcribed, with ``mem_print`` called for every
  visited entry, the C-bit stripped from CR3 and every 64-bit entry, and the two QEMU bugs sevmon fixes (PAE 2 MiB
  PA column: bits 21..51; LA57 ``info mem``: the 4-level rules).
* ``brute_translate``: one address, ``x86_cpu_get_phys_page_attrs_debug`` transcribed, also returning the leaf
  entry, page size, the ``info mem`` prot and whether the leaf was private.
"""

from __future__ import annotations

from sevmon.memory.ram import RAM
from sevmon.x86.cpu import CR4_PSE, CpuState
from tests.x86.x86_testmem import ram_l, ram_q

U64 = (1 << 64) - 1
ADDR = 0x000FFFFFFFFFF000
T = 0x3FFFFFFFFF000       # monitor.c table mask
FLAGS = ((63, "X"), (8, "G"), (7, "P"), (6, "D"), (5, "A"), (4, "C"), (3, "T"), (2, "U"), (1, "W"))


def canon(cpu: CpuState, addr: int) -> int:
    if cpu.paging_mode() == "5level":
        return (addr | -(1 << 57)) & U64 if addr & (1 << 56) else addr
    if cpu.paging_mode() == "4level":
        return (addr | -(1 << 48)) & U64 if addr & (1 << 47) else addr
    return addr


def pte_line(cpu: CpuState, addr: int, pte: int, mask: int) -> str:
    flags = "".join(ch if pte >> bit & 1 else "-" for bit, ch in FLAGS)
    return f"{canon(cpu, addr):016x}: {pte & mask & U64:016x} {flags}"


class MemPrinter:
    """``mem_print`` with its static state."""

    def __init__(self, cpu: CpuState):
        self.cpu = cpu
        self.start = -1
        self.last = 0
        self.lines: list[str] = []

    def __call__(self, end: int, prot: int) -> None:
        if prot != self.last:
            if self.start != -1:
                c = self.cpu
                p = self.last
                self.lines.append(
                    f"{canon(c, self.start):016x}-{canon(c, end):016x} {canon(c, end - self.start):016x} "
                    f"{'u' if p & 4 else '-'}r{'w' if p & 2 else '-'}")
            self.start = end if prot else -1
            self.last = prot


def _walk(ram: RAM, cpu: CpuState, me: int) -> tuple[list[str], list[str]]:
    mode = cpu.paging_mode()
    tlb: list[str] = []
    mp = MemPrinter(cpu)
    nm = ~me
    if mode == "off":
        return ["PG disabled"], ["PG disabled"]
    if mode == "32":
        pgd = cpu.cr3 & 0xFFFFF000
        for l1 in range(1024):
            pde = ram_l(ram, pgd + l1 * 4)
            end = l1 << 22
            if not pde & 1:
                mp(end, 0)
            elif pde & 0x80 and cpu.cr4 & CR4_PSE:
                tlb.append(pte_line(cpu, end, pde, 0xFFE00000))
                mp(end, pde & 7)
            else:
                for l2 in range(1024):
                    pte = ram_l(ram, (pde & 0xFFFFF000) + l2 * 4)
                    end = (l1 << 22) + (l2 << 12)
                    if pte & 1:
                        tlb.append(pte_line(cpu, end, pte & ~0x80, 0xFFFFF000))
                        mp(end, pte & pde & 7)
                    else:
                        mp(end, 0)
        mp(1 << 32, 0)
    elif mode == "pae":
        pdp = (cpu.cr3 & nm) & ~0x1F
        for l1 in range(4):
            pdpe = ram_q(ram, pdp + l1 * 8) & nm
            end = l1 << 30
            if not pdpe & 1:
                mp(end, 0)
                continue
            for l2 in range(512):
                pde = ram_q(ram, (pdpe & T) + l2 * 8) & nm
                end = (l1 << 30) + (l2 << 21)
                if not pde & 1:
                    mp(end, 0)
                elif pde & 0x80:
                    tlb.append(pte_line(cpu, end, pde, 0x000FFFFFFFE00000))   # QEMU: ~0xfffff (bug #1)
                    mp(end, pde & 7)
                else:
                    for l3 in range(512):
                        pte = ram_q(ram, (pde & T) + l3 * 8) & nm
                        end = (l1 << 30) + (l2 << 21) + (l3 << 12)
                        if pte & 1:
                            tlb.append(pte_line(cpu, end, pte & ~0x80, 0x000FFFFFFFFFF000))  # QEMU: ~0xfff
                            mp(end, pte & pde & 7)
                        else:
                            mp(end, 0)
        mp(1 << 32, 0)
    else:
        def la48(l0: int, pml4: int, up: int) -> None:
            for l1 in range(512):
                pml4e = ram_q(ram, pml4 + l1 * 8) & nm
                end = (l0 << 48) + (l1 << 39)
                if not pml4e & 1:
                    mp(end, 0)
                    continue
                for l2 in range(512):
                    pdpe = ram_q(ram, (pml4e & T) + l2 * 8) & nm
                    end = (l0 << 48) + (l1 << 39) + (l2 << 30)
                    if not pdpe & 1:
                        mp(end, 0)
                        continue
                    if pdpe & 0x80:
                        tlb.append(pte_line(cpu, end, pdpe, 0x3FFFFC0000000))
                        mp(end, pdpe & 7 & up & pml4e)
                        continue
                    for l3 in range(512):
                        pde = ram_q(ram, (pdpe & T) + l3 * 8) & nm
                        end = (l0 << 48) + (l1 << 39) + (l2 << 30) + (l3 << 21)
                        if not pde & 1:
                            mp(end, 0)
                            continue
                        if pde & 0x80:
                            tlb.append(pte_line(cpu, end, pde, 0x3FFFFFFE00000))
                            mp(end, pde & 7 & up & pml4e & pdpe)
                            continue
                        for l4 in range(512):
                            pte = ram_q(ram, (pde & T) + l4 * 8) & nm
                            end = (l0 << 48) + (l1 << 39) + (l2 << 30) + (l3 << 21) + (l4 << 12)
                            if pte & 1:
                                tlb.append(pte_line(cpu, end, pte & ~0x80, 0x3FFFFFFFFF000))
                                mp(end, pte & 7 & up & pml4e & pdpe & pde)
                            else:
                                mp(end, 0)

        root = (cpu.cr3 & nm) & T
        if mode == "4level":
            la48(0, root, 7)
            mp(1 << 48, 0)
        else:
            for l0 in range(512):
                pml5e = ram_q(ram, root + l0 * 8) & nm
                if pml5e & 1:
                    la48(l0, pml5e & T, pml5e)
                else:
                    mp(l0 << 48, 0)
            mp(1 << 57, 0)
    return tlb, mp.lines


def naive_tlb(ram: RAM, cpu: CpuState, me: int = 0) -> list[str]:
    return _walk(ram, cpu, me if cpu.paging_mode() != "32" else 0)[0]


def naive_mem(ram: RAM, cpu: CpuState, me: int = 0) -> list[str]:
    return _walk(ram, cpu, me if cpu.paging_mode() != "32" else 0)[1]


def brute_translate(ram: RAM, cpu: CpuState, va: int, me: int = 0):
    """``(gpa, private, leaf entry, size, prot)`` or None, for one address."""
    va &= U64
    mode = cpu.paging_mode()
    if mode == "off":
        return va & (ADDR | 0xFFF), True, None, 4096, 7
    if mode == "32":
        va &= 0xFFFFFFFF
        pde = ram_l(ram, (cpu.cr3 & 0xFFFFF000) + (va >> 22) * 4)
        if not pde & 1:
            return None
        if pde & 0x80 and cpu.cr4 & CR4_PSE:
            base = (pde & 0xFFC00000) | ((pde >> 13) & 0xFF) << 32
            return base | (va & 0x3FFFFF), True, pde, 1 << 22, pde & 7
        pte = ram_l(ram, (pde & 0xFFFFF000) + ((va >> 12) & 0x3FF) * 4)
        if not pte & 1:
            return None
        return (pte & 0xFFFFF000) | (va & 0xFFF), True, pte, 4096, pte & pde & 7
    nm = ~me
    if mode == "pae":
        va &= 0xFFFFFFFF
        pdpe = ram_q(ram, ((cpu.cr3 & nm) & ~0x1F) + (va >> 30) * 8)
        if not pdpe & 1:
            return None
        table, prot = pdpe & nm & ADDR, 7          # PAE PDPTEs do not take part in prot
        levels = [(21, True), (12, True)]
    else:
        s = va - (1 << 64) if va >> 63 else va
        top = 56 if mode == "5level" else 47
        if s >> top not in (0, -1):
            return None
        table, prot = (cpu.cr3 & nm) & ADDR, 7
        levels = ([(48, False)] if mode == "5level" else []) + [(39, False), (30, True), (21, True), (12, True)]
    for shift, ps_ok in levels:
        raw = ram_q(ram, table + ((va >> shift) & 0x1FF) * 8)
        if not raw & 1:
            return None
        e = raw & nm
        private = bool(raw & me) or not me
        prot &= e
        if shift == 12 or (ps_ok and e & 0x80):
            size = 1 << shift
            return (e & ADDR & ~(size - 1)) | (va & (size - 1)), private, e, size, prot & 7
        table = e & ADDR
    raise AssertionError
