"""Test helpers for the x86 walkers: fixture cores as ``PhysicalMemory`` over plain RAM, with counters.

Not a production loader (that lives elsewhere): just enough pyelftools to turn a sparse ELF core's PT_LOAD
segments (``p_paddr`` = guest-physical address) into RAM frames.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from elftools.elf.elffile import ELFFile

from sevmon.memory.ram import RAM, MemoryAccessError
from sevmon.x86.cpu import CR4_PSE, CpuState

FIXTURES = Path(__file__).resolve().parents[1] / "data"   # the QEMU 7.2 captures (tests/data/README.md)


def load_core(path: Path | str) -> RAM:
    """RAM holding every PT_LOAD segment of an ELF core at its ``p_paddr`` (bss tails zero-filled)."""
    ram = RAM(1 << 40)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            data = seg.data()
            data += bytes(seg["p_memsz"] - len(data))
            if data:
                ram.write(seg["p_paddr"], data)
    return ram


def load_fixture(name: str) -> tuple[RAM, CpuState, dict[str, str]]:
    d = FIXTURES / name
    ram = load_core(d / "core.elf")
    cpu = CpuState.from_json_file(str(d / "cpu.json"))
    hmp = json.loads((d / "hmp.json").read_text())
    return ram, cpu, hmp


def count_runs(pfns: Iterable[int]) -> int:
    n, prev = 0, None
    for f in sorted(set(pfns)):
        if prev is None or f != prev + 1:
            n += 1
        prev = f
    return n


class CountingMemory:
    """``PhysicalMemory`` over a plain ``RAM``: counts calls, and with ``cache=True`` groups each call's misses
    into contiguous runs (one "round trip" per run, as the SEV page cache does) and remembers what it read."""

    def __init__(self, ram: RAM, cache: bool = False):
        self.ram = ram
        self.cache: dict[int, bytes | None] | None = {} if cache else None
        self.calls = 0          # read_frames calls
        self.frames = 0         # frames asked for (misses only when caching)
        self.runs = 0           # contiguous runs of those frames
        self.distinct: set[int] = set()
        self.requests: list[list[int]] = []
        self.byte_reads = 0     # read() calls: the walkers must never make any

    def read_frames(self, pfns: Iterable[int]) -> dict[int, bytes]:
        pfns = list(pfns)
        self.calls += 1
        self.requests.append(pfns)
        if self.cache is not None:
            miss = sorted({f for f in pfns if f not in self.cache})
            for f in miss:
                fr = self.ram.frame(f)
                self.cache[f] = bytes(fr) if fr is not None else None
            src = self.cache
        else:
            miss = pfns
            src = {f: (bytes(fr) if (fr := self.ram.frame(f)) is not None else None) for f in pfns}
        self.frames += len(miss)
        self.runs += count_runs(miss)
        self.distinct.update(pfns)
        return {f: src[f] for f in pfns if src[f] is not None}

    def read(self, gpa: int, size: int, *, private: bool = True) -> bytes:
        self.byte_reads += 1
        return self.ram.read(gpa, size)

    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        self.ram.write(gpa, data)


def ram_q(ram: RAM, addr: int) -> int:
    """One 8-byte entry straight from RAM (non-RAM reads as 0, like QEMU's unassigned memory)."""
    try:
        return struct.unpack("<Q", ram.read(addr, 8))[0]
    except MemoryAccessError:
        return 0


def ram_l(ram: RAM, addr: int) -> int:
    try:
        return struct.unpack("<I", ram.read(addr, 4))[0]
    except MemoryAccessError:
        return 0


def copy_ram(ram: RAM) -> RAM:
    out = RAM(ram.size)
    for pfn in ram.frames():
        out.set_frame(pfn, bytes(ram.frame(pfn)))
    return out


def sev_copy(ram: RAM, cpu: CpuState, cbit: int = 47) -> tuple[RAM, CpuState]:
    """An SEV-like copy: the C-bit set in CR3 and in every present entry of every table reachable from CR3.

    Tables are found with the original (C-bit free) entries; each table page is rewritten once. PAE's root is
    the 4 PDPTEs at CR3, not the whole page (the page holds other processes' PDPTs).
    """
    c = 1 << cbit
    out = copy_ram(ram)
    mode = cpu.paging_mode()
    assert mode in ("pae", "4level", "5level"), mode
    done: set[int] = set()

    def mark(addr: int, n: int) -> list[int]:
        ents = []
        for i in range(n):
            e = ram_q(ram, addr + 8 * i)
            ents.append(e)
            if e & 1:
                out.write(addr + 8 * i, struct.pack("<Q", e | c))
        return ents

    def table(addr: int, depth: int, leaf_levels: set[int], last: int) -> None:
        if addr in done or not ram.has(addr >> 12):
            return
        done.add(addr)
        for e in mark(addr, 512):
            if not e & 1 or depth == last or (depth in leaf_levels and e & 0x80):
                continue
            table(e & 0x3FFFFFFFFF000, depth + 1, leaf_levels, last)

    if mode == "pae":
        base = cpu.cr3 & ~0x1F
        for e in mark(base, 4):
            if e & 1:
                table(e & 0x3FFFFFFFFF000, 1, {1}, 2)
    elif mode == "4level":
        table(cpu.cr3 & 0x3FFFFFFFFF000, 0, {1, 2}, 3)
    else:
        table(cpu.cr3 & 0x3FFFFFFFFF000, 0, {2, 3}, 4)
    cpu2 = CpuState(cpu.index, dict(cpu.regs))
    cpu2.set("cr3", cpu.cr3 | c)
    return out, cpu2


__all__ = ["FIXTURES", "load_core", "load_fixture", "count_runs", "CountingMemory", "ram_q", "ram_l",
           "copy_ram", "sev_copy", "CR4_PSE"]
