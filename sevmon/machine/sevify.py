"""Make a plain guest image look like a Linux SEV guest's memory: set the C-bit in CR3 and
in every present entry of every table reachable from it (64-bit entries only: PAE,
4-level, 5-level), as ``sme_enable`` + ``_PAGE_ENC`` do in a real guest. Runs on the
plaintext image before launch encrypts it; 32-bit 2-level tables have no C-bit.
"""

from __future__ import annotations

import struct

from sevmon.memory.ram import PAGE_SHIFT, RAM
from sevmon.x86.cpu import CpuState
from sevmon.x86.modes import mode_of
from sevmon.x86.pte import PG_ADDRESS_MASK, PG_PRESENT, PG_PSE


def set_cbit(ram: RAM, cpu: CpuState, cbitpos: int) -> int:
    """Set the C-bit in the tables reachable from CR3 (and in CR3 in long mode).

    Returns the number of table pages rewritten. Tables are visited once even when
    shared; large leaves (PS at the PDPT/PD level) end the descent.
    """
    return _rewrite(ram, cpu, cbitpos, True)


def clear_cbit(ram: RAM, cpu: CpuState, cbitpos: int) -> int:
    """The reverse of :func:`set_cbit`: a dump of an SEV guest made a plain guest again."""
    return _rewrite(ram, cpu, cbitpos, False)


def _rewrite(ram: RAM, cpu: CpuState, cbitpos: int, on: bool) -> int:
    mode = mode_of(cpu)
    if mode is None or not mode.wide:
        return 0
    cbit = 1 << cbitpos
    levels = len(mode.levels)
    cr3 = cpu.cr3 & ~cbit
    if not mode.long_mode:  # PAE: the 32-byte PDPT, CR3 itself has no C-bit
        root_addr = cr3 & 0xFFFFFFE0
        frontier = {root_addr >> PAGE_SHIFT: (root_addr & 0xFFF, mode.levels[0].entries)}
    else:
        frontier = {(cr3 & PG_ADDRESS_MASK) >> PAGE_SHIFT: (0, 512)}
        cpu.set("cr3", cpu.cr3 | cbit if on else cr3)
    done: set[int] = set()
    rewritten = 0
    for depth in range(levels):
        nxt: dict[int, tuple[int, int]] = {}
        leaf_level = depth == levels - 1
        for pfn, (offset, count) in frontier.items():
            if pfn in done:
                continue
            done.add(pfn)
            frame = ram.frame(pfn)
            if frame is None:
                continue
            entries = list(struct.unpack_from(f"<{count}Q", frame, offset))
            for i, e in enumerate(entries):
                if not e & PG_PRESENT:
                    continue
                entries[i] = e | cbit if on else e & ~cbit
                large = e & PG_PSE and mode.levels[depth].large_leaf
                if not leaf_level and not large:
                    nxt[((e & ~cbit) & PG_ADDRESS_MASK) >> PAGE_SHIFT] = (0, 512)
            struct.pack_into(f"<{count}Q", frame, offset, *entries)
            rewritten += 1
        frontier = nxt
    return rewritten
