"""Property tests: random page tables in every paging mode against the plain reference walkers.

Each example builds a small random tree of tables (4 KiB/2 MiB/4 MiB/1 GiB leaves, NX, U/W/G/D/A/PCD/PWT, PAT,
ignored PS bits, available and reserved address bits, shared tables, a self-reference, pointers to non-RAM,
garbage in non-present entries, the C-bit on or off per entry) and checks that the level-batched walker agrees
with a naive 8-bytes-per-read transcription of QEMU's loops and with a per-address translator.
"""

from __future__ import annotations

import bisect
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevmon.memory.ram import RAM
from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState
from tests.x86.x86_reference import brute_translate, naive_mem, naive_tlb
from tests.x86.x86_testmem import CountingMemory

U64 = (1 << 64) - 1
PG, PE = 1 << 31, 1
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
EFER_LONG = 0xD00          # LME | LMA | NXE

# per mode: entries per table at each depth (root first), whether PS makes a leaf there, entry width
SHAPES = {
    "32": ([1024, 1024], [True, False], 4),
    "pae": ([4, 512, 512], [False, True, False], 8),
    "4level": ([512] * 4, [False, True, True, False], 8),
    "5level": ([512] * 5, [False, False, True, True, False], 8),
}


class Builder:
    def __init__(self, rng: random.Random, mode: str, pse: bool, me: int):
        self.rng, self.mode, self.me = rng, mode, me
        self.counts, self.ps_ok, self.width = SHAPES[mode]
        if mode == "32" and not pse:
            self.ps_ok = [False, False]
        self.pse = pse
        self.ram = RAM(1 << 40)
        self.budget = rng.choice([3, 6, 10, 14])
        self.by_depth: dict[int, list[int]] = {}
        self.next_free = rng.randrange(0x100, 0x10000)

    def alloc(self) -> int:
        if self.rng.random() < 0.4:
            self.next_free += self.rng.randrange(2, 50)     # break contiguity now and then
        f = self.next_free
        self.next_free += 1
        self.ram.ensure(f)
        return f

    def put(self, addr: int, value: int) -> None:
        fmt = "<Q" if self.width == 8 else "<I"
        self.ram.write(addr, struct.pack(fmt, value))

    def flags(self, leaf: bool, depth: int, uw: int) -> int:
        r = self.rng
        f = 1 | (r.getrandbits(8) << 1) & 0x178               # PWT PCD A D (G) — PS set below
        if leaf:
            f |= uw if r.random() < 0.7 else r.getrandbits(2) << 1     # U/W mostly the table's own
        else:
            f |= 6 if r.random() < 0.8 else r.getrandbits(2) << 1      # tables mostly let U/W through
        f |= r.getrandbits(1) << 8 if leaf else 0
        f |= r.getrandbits(3) << 9                              # available bits 9..11
        if self.width == 8:
            if r.random() < 0.5:
                f |= 1 << 63                                    # NX
            if r.random() < 0.2:
                f |= r.getrandbits(7) << 52                     # available 52..58
            if leaf and r.random() < 0.1:
                f |= r.getrandbits(4) << 59                     # protection keys
            if self.me and r.random() < 0.75:
                f |= self.me
        return f

    def address(self, size_shift: int) -> int:
        r = self.rng
        if self.width == 4:
            return r.getrandbits(20) << 12                      # 4M leaves: bits 12..21 hold PAT/PSE-36/reserved
        a = r.getrandbits(38) << 12
        if r.random() < 0.15:
            a |= r.choice([1 << 50, 1 << 51, 3 << 50])          # beyond the monitor's 50-bit mask
        if size_shift > 12 and r.random() < 0.3:
            a |= r.getrandbits(size_shift - 12) << 12           # PAT / reserved low bits of a big page
        return a & ~self.me

    def table(self, addr: int, depth: int) -> None:
        r = self.rng
        n = self.counts[depth]
        last = depth == len(self.counts) - 1
        for _ in range(r.choice([0, 1, 3, 8])):                 # garbage in non-present entries
            self.put(addr + r.randrange(n) * self.width, r.getrandbits(self.width * 8) & ~1)
        uw = r.getrandbits(2) << 1
        picks = {r.randrange(n) for _ in range(r.choice([1, 2, 3, 5, 9]))}
        picks |= set(r.sample([0, n - 1, n // 2 - 1, n // 2], r.randrange(3)))
        if last and r.random() < 0.5:                           # a run of neighbours: info mem merges them
            first = r.randrange(n)
            picks |= set(range(first, min(n, first + r.randrange(2, 40))))
        for idx in sorted(picks):
            shift = 12 + (len(self.counts) - 1 - depth) * (10 if self.width == 4 else 9)
            if last or (self.ps_ok[depth] and r.random() < 0.35):
                e = self.address(shift) | self.flags(True, depth, uw)
                if not last:
                    e |= 0x80
                elif r.random() < 0.3:
                    e |= 0x80                                   # PAT bit of a 4K PTE: printed as '-'
            else:
                e = self.flags(False, depth, uw) & ~0x80
                if not self.ps_ok[depth] and r.random() < 0.2:
                    e |= 0x80                                   # PS where it is ignored
                choice = r.random()
                if choice < 0.08:
                    e |= r.randrange(0x40000, 0x80000) << 12    # not RAM: an all-zero table
                elif choice < 0.25 and self.by_depth.get(depth + 1):
                    e |= r.choice(self.by_depth[depth + 1]) << 12   # shared table
                elif choice < 0.3 and depth > 0 and self.width == 8 and self.by_depth.get(depth - 1):
                    e |= r.choice(self.by_depth[depth - 1]) << 12   # points back up (self-map style)
                elif self.budget > 0:
                    self.budget -= 1
                    f = self.alloc()
                    self.by_depth.setdefault(depth + 1, []).append(f)
                    e |= f << 12
                    self.put(addr + idx * self.width, e)
                    self.table(f << 12, depth + 1)
                    continue
                else:
                    continue
            self.put(addr + idx * self.width, e)

    def build(self) -> CpuState:
        r = self.rng
        root = self.alloc()
        self.by_depth[0] = [root]
        if self.mode == "pae":
            for i in range(512):                                # other PDPTs share the page: garbage
                self.put((root << 12) + i * 8, r.getrandbits(64))
            off = r.randrange(128) * 32
            for i in range(4):
                self.put((root << 12) + off + i * 8, 0)
            cr3 = (root << 12) + off + r.getrandbits(5)     # bits 0..4 (PWT/PCD and ignored) under ~0x1f
            self.table((root << 12) + off, 0)
        else:
            cr3 = (root << 12) | r.getrandbits(12)            # PCID / PWT / PCD
            self.table(root << 12, 0)
        if self.me and r.random() < 0.9:
            cr3 |= self.me
        regs = {"cr0": PG | PE, "cr3": cr3}
        regs["cr4"] = {"32": CR4_PSE if self.pse else 0, "pae": CR4_PAE | (CR4_PSE if self.pse else 0),
                       "4level": CR4_PAE, "5level": CR4_PAE | CR4_LA57}[self.mode]
        regs["efer"] = {"32": 0, "pae": 0x800, "4level": EFER_LONG, "5level": EFER_LONG}[self.mode]
        cpu = CpuState(regs=regs)
        assert cpu.paging_mode() == self.mode
        return cpu


def clean(mode: str, m: paging.Mapping) -> bool:
    """True when QEMU's info-tlb PA column and gva2gpa's PG_ADDRESS_MASK read the same bits of this entry."""
    if mode in ("4level", "5level"):
        return not m.entry >> 50 & 3
    if mode == "pae":
        return m.size != 4096 or not m.entry >> 52
    return m.size == 4096 or not m.entry & 0x3FE000


def run_case(mode: str, pse: bool, me: int, seed: int) -> None:
    rng = random.Random(seed)
    b = Builder(rng, mode, pse, me)
    cpu = b.build()
    ram = b.ram

    mem = CountingMemory(ram, cache=True)
    tlb = list(paging.info_tlb(mem, cpu, me))
    levels = len(SHAPES[mode][0])
    assert mem.calls <= levels
    for req in mem.requests:
        assert req == sorted(set(req))
    assert (mem.frames, mem.runs) == paging.count_table_reads(CountingMemory(ram), cpu, me)
    assert mem.byte_reads == 0

    assert tlb == naive_tlb(ram, cpu, me)
    assert list(paging.info_mem(CountingMemory(ram), cpu, me)) == naive_mem(ram, cpu, me)

    maps = list(paging.walk(CountingMemory(ram), cpu, me))
    assert len(maps) == len(tlb)
    eff_me = me if mode != "32" else 0
    tmem = CountingMemory(ram)
    for m, line in zip(maps, tlb, strict=True):
        assert line.startswith(f"{m.va:016x}: {m.pa:016x} ")
        off = rng.randrange(m.size)
        ref = brute_translate(ram, cpu, m.va + off, eff_me)
        assert ref is not None
        gpa, private, entry, size, prot = ref
        assert (entry, size, prot, private) == (m.entry, m.size, m.prot, m.private)
        assert paging.translate(tmem, cpu, m.va + off, me) == (gpa, private)
        if clean(mode, m):
            assert gpa == m.pa + off
        assert paging.gva2gpa_text(tmem, cpu, m.va + off, me) == (f"gpa: {gpa:#x}" if gpa else "gpa: 0")

    # arbitrary addresses (holes, non-canonical, beyond 32 bits in legacy modes): translate == brute force,
    # and a mapped address lies in a listed mapping
    starts = [m.va for m in maps]
    for _ in range(60):
        va = rng.getrandbits(64) if rng.random() < 0.3 else (
            (rng.choice(starts) + rng.randrange(-(1 << 22), 1 << 22)) & U64 if starts else rng.getrandbits(48))
        ref = brute_translate(ram, cpu, va, eff_me)
        got = paging.translate(tmem, cpu, va, me)
        assert got == (None if ref is None else ref[:2]), hex(va)
        if ref is not None:
            lva = va & 0xFFFFFFFF if mode in ("32", "pae") else va
            i = bisect.bisect_right(starts, lva) - 1
            assert i >= 0 and starts[i] <= lva < starts[i] + maps[i].size, hex(va)


MODES = st.sampled_from(["32", "pae", "4level", "5level"])
COMMON = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(mode=MODES, pse=st.booleans(), cbit=st.sampled_from([0, 47, 51]), seed=st.integers(0, 2**32))
def test_random_tables(mode, pse, cbit, seed):
    run_case(mode, pse, (1 << cbit) if cbit else 0, seed)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_random_5level_sev(seed):
    run_case("5level", False, 1 << 47, seed)
