"""A generated guest with N mapped 4 KiB pages in scattered tables (4-level paging).

Only the tables exist in RAM (the mapped frames are never read by info mem/tlb), so the
guest costs memory in proportion to its table pages: N/512 page tables plus the upper
levels, written once each through the guest's own key.
"""

from __future__ import annotations

import random
import struct

from sevmon.memory.ram import PAGE_SIZE, RAM
from sevmon.x86.cpu import CpuState
from sevmon.x86.modes import MODES
from sevmon.x86.pte import PG_ACCESSED as A
from sevmon.x86.pte import PG_ADDRESS_MASK
from sevmon.x86.pte import PG_DIRTY as D
from sevmon.x86.pte import PG_PRESENT as P
from sevmon.x86.pte import PG_RW as RW
from sevmon.x86.pte import PG_USER as US
from sevmon.x86.pte import TABLE_FLAGS as TABLE

MODE = MODES["4level"]


def build_scale_guest(n_pages: int, write, cbit: int, ram_size: int = 1 << 40, seed: int = 1) -> CpuState:
    """Map ``n_pages`` user pages from VA 0x10000000000 in 4 KiB pages; return the vCPU."""
    rng = random.Random(seed)
    used: set[int] = set()

    def alloc() -> int:
        while True:
            pfn = rng.randrange(1 << 16, ram_size >> 12)
            if pfn not in used:
                used.add(pfn)
                return pfn << 12

    pml4 = alloc()
    tables: dict[int, list[int]] = {pml4: [0] * 512}
    base = 0x10000000000
    n_pt = (n_pages + 511) // 512
    for t in range(n_pt):
        va = base + t * (512 * PAGE_SIZE)
        entries = []
        for i in range(min(512, n_pages - t * 512)):
            flags = P | US | A | (RW | D if i & 1 else 0)
            entries.append(((t * 512 + i) << 12) | flags | cbit)
        entries += [0] * (512 - len(entries))
        pt = alloc()
        write(pt, struct.pack("<512Q", *entries))
        # link it in, creating PDPT/PD tables as needed (kept in memory, written at the end)
        table = pml4
        for shift in (lvl.shift for lvl in MODE.levels[:2]):
            idx = (va >> shift) & 511
            if not tables[table][idx] & P:
                child = alloc()
                tables[child] = [0] * 512
                tables[table][idx] = child | TABLE | cbit
            table = tables[table][idx] & ~cbit & PG_ADDRESS_MASK
        tables[table][(va >> 21) & 511] = pt | TABLE | cbit
    for pa, entries in tables.items():
        write(pa, struct.pack("<512Q", *entries))
    return CpuState(0, {"cr0": MODE.cr0, "cr3": pml4 | cbit, "cr4": MODE.cr4, "efer": MODE.efer})


def make_scale_ram() -> RAM:
    return RAM(1 << 40)
