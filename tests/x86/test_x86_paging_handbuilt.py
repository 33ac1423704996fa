"""Hand-built page tables: 5-level sign extension and the 2^57 flush, the canonical hole, masks' corner cases."""

from __future__ import annotations

import struct

import pytest

from sevmon.memory.ram import RAM
from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState
from tests.x86.x86_testmem import CountingMemory, sev_copy

PG, PE = 1 << 31, 1
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
NX = 1 << 63
P, W, U, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
TBL = P | W | U | A


class Tables:
    def __init__(self, width: int = 8):
        self.ram = RAM(1 << 30)
        self.width = width

    def set(self, frame: int, idx: int, value: int) -> None:
        self.ram.write((frame << 12) + idx * self.width, struct.pack("<Q" if self.width == 8 else "<I", value))

    def link(self, frame: int, idx: int, child: int, flags: int = TBL) -> None:
        self.set(frame, idx, (child << 12) | flags)


def lines(gen) -> list[str]:
    return list(gen)


def five_level() -> tuple[RAM, CpuState]:
    t = Tables()
    t.ram.ensure(0x10)
    t.link(0x10, 0, 0x11)                       # PML5[0] -> PML4 A
    t.link(0x11, 0, 0x12)
    t.link(0x12, 0, 0x13)
    t.link(0x13, 0, 0x14)
    t.set(0x14, 1, 0x0 | P | W | U | A | D)     # VA 0x1000 -> GPA 0
    t.link(0x11, 256, 0x15)                     # PML4 A[256]: bit 47 set, not a sign bit under LA57
    t.set(0x15, 0, 0x40000000 | PS | P | W)     # 1 GiB
    t.link(0x10, 256, 0x16)                     # PML5[256]: bit 56 -> sign-extended
    t.link(0x16, 0, 0x17)
    t.link(0x17, 0, 0x18)
    t.set(0x18, 5, NX | 0xE00000 | G | PS | D | A | W | P)
    t.link(0x10, 511, 0x19)                     # PML5[511] / PML4[511] / PDPT[511]: the last GiB
    t.link(0x19, 511, 0x1A)
    t.set(0x1A, 511, 0xC0000000 | PS | P | W)
    cpu = CpuState(regs={"cr0": PG | PE, "cr3": 0x10000, "cr4": CR4_PAE | CR4_LA57, "efer": 0xD00})
    assert cpu.paging_mode() == "5level"
    return t.ram, cpu


TLB_5 = [
    "0000000000001000: 0000000000000000 ---DA--UW",
    "0000800000000000: 0000000040000000 --P-----W",
    "ff00000000a00000: 0000000000e00000 XGPDA---W",
    "ffffffffc0000000: 00000000c0000000 --P-----W",
]
MEM_5 = [
    "0000000000001000-0000000000002000 0000000000001000 urw",
    "0000800000000000-0000800040000000 0000000040000000 -rw",
    "ff00000000a00000-ff00000000c00000 0000000000200000 -rw",
    "ffffffffc0000000-0200000000000000 0000000040000000 -rw",
]
GVA_5 = {
    0x1000: "gpa: 0",
    0x1ABC: "gpa: 0xabc",
    0x0000800000001234: "gpa: 0x40001234",
    0xFF00000000A01234: "gpa: 0xe01234",
    0x0100000000A01234: "Unmapped",          # bit 56 set without sign extension: not canonical
    0xFFFFFFFFC0001234: "gpa: 0xc0001234",
    0xFFFFFFFFFFFFFFFF: "gpa: 0xffffffff",
    0x2000: "Unmapped",
}


def test_5level_tlb_mem_gva2gpa():
    ram, cpu = five_level()
    mem = CountingMemory(ram, cache=True)
    assert lines(paging.info_tlb(mem, cpu)) == TLB_5
    assert mem.calls == 5                       # root + one call per level below it
    assert lines(paging.info_mem(CountingMemory(ram), cpu)) == MEM_5
    for va, want in GVA_5.items():
        assert paging.gva2gpa_text(CountingMemory(ram), cpu, va) == want, hex(va)
    maps = list(paging.walk(CountingMemory(ram), cpu))
    assert [(m.va, m.size, m.prot) for m in maps] == [
        (0x1000, 4096, 7), (0x800000000000, 1 << 30, 3), (0xFF00000000A00000, 1 << 21, 3),
        (0xFFFFFFFFC0000000, 1 << 30, 3)]


def test_5level_sev_with_a_shared_page():
    ram, cpu = five_level()
    me = 1 << 51
    sram, scpu = sev_copy(ram, cpu, 51)
    sram.write((0x14 << 12) + 8, struct.pack("<Q", P | W | U | A | D))   # the 4K leaf: C-bit clear
    assert lines(paging.info_tlb(CountingMemory(sram), scpu, me)) == TLB_5
    assert lines(paging.info_mem(CountingMemory(sram), scpu, me)) == MEM_5
    for va, want in GVA_5.items():
        assert paging.gva2gpa_text(CountingMemory(sram), scpu, va, me) == want, hex(va)
    assert paging.translate(CountingMemory(sram), scpu, 0x1008, me) == (8, False)
    assert paging.translate(CountingMemory(sram), scpu, 0xFF00000000A01234, me) == (0xE01234, True)
    assert [m.private for m in paging.walk(CountingMemory(sram), scpu, me)] == [False, True, True, True]


def four_level_hole() -> tuple[RAM, CpuState]:
    t = Tables()
    t.ram.ensure(0x20)
    t.link(0x20, 255, 0x21)
    t.link(0x21, 511, 0x22)
    t.link(0x22, 511, 0x23)
    t.set(0x23, 511, 0x5000 | P | W | U)        # 00007ffffffff000
    t.link(0x20, 256, 0x24)
    t.link(0x24, 0, 0x25)
    t.link(0x25, 0, 0x26)
    t.set(0x26, 0, NX | 0x6000 | P | W | U)     # ffff800000000000: NX differs, still merges
    t.link(0x20, 511, 0x27)
    t.set(0x27, 511, 0xC0000000 | PS | P | W)
    return t.ram, CpuState(regs={"cr0": PG | PE, "cr3": 0x20000, "cr4": CR4_PAE, "efer": 0xD00})


def test_4level_canonical_hole_merge_and_top():
    ram, cpu = four_level_hole()
    assert lines(paging.info_tlb(CountingMemory(ram), cpu)) == [
        "00007ffffffff000: 0000000000005000 -------UW",
        "ffff800000000000: 0000000000006000 X------UW",
        "ffffffffc0000000: 00000000c0000000 --P-----W",
    ]
    assert lines(paging.info_mem(CountingMemory(ram), cpu)) == [
        "00007ffffffff000-ffff800000001000 0000000000002000 urw",
        "ffffffffc0000000-0001000000000000 0000000040000000 -rw",
    ]
    assert paging.gva2gpa_text(CountingMemory(ram), cpu, 0x0000800000000000) == "Unmapped"   # non-canonical


def test_4level_size_column_canonicalized():
    """A range of 2^47 bytes prints its size sign-extended, as QEMU's addr_canonical(end - start) does."""
    t = Tables()
    t.ram.ensure(0x30)
    for i in range(512):
        t.set(0x31, i, (i << 30) | PS | P | W)  # one PDPT of 1 GiB leaves, shared by the whole top half
    for i in range(256, 512):
        t.link(0x30, i, 0x31)
    cpu = CpuState(regs={"cr0": PG | PE, "cr3": 0x30000, "cr4": CR4_PAE, "efer": 0xD00})
    mem = CountingMemory(t.ram, cache=True)
    assert lines(paging.info_mem(mem, cpu)) == ["ffff800000000000-0001000000000000 ffff800000000000 -rw"]
    assert (mem.calls, mem.frames) == (2, 2)    # the shared PDPT is read once
    assert sum(1 for _ in paging.info_tlb(CountingMemory(t.ram), cpu)) == 256 * 512


def test_32bit_4m_masks():
    """info tlb prints pde & 0xffe00000 (bit 21 kept, PSE-36 dropped); gva2gpa uses PSE-36 and drops bit 21."""
    t = Tables(width=4)
    t.ram.ensure(0x40)
    pde = 0xC0000000 | (1 << 21) | (0x5 << 13) | (1 << 12) | G | PS | D | A | W | P
    t.set(0x40, 0x300, pde)
    t.link(0x40, 0x301, 0x41, P | W)            # 4K table: PAT bit (7) printed as '-'
    t.set(0x41, 2, 0x12345000 | PS | A | U | P)
    regs = {"cr0": PG | PE, "cr3": 0x40000, "cr4": CR4_PSE, "efer": 0}
    cpu = CpuState(regs=regs)
    ram = t.ram
    assert lines(paging.info_tlb(CountingMemory(ram), cpu)) == [
        "00000000c0000000: 00000000c0200000 -GPDA---W",
        "00000000c0402000: 0000000012345000 ----A--U-",
    ]
    assert lines(paging.info_mem(CountingMemory(ram), cpu)) == [
        "00000000c0000000-00000000c0400000 0000000000400000 -rw",
        "00000000c0402000-00000000c0403000 0000000000001000 -r-",
    ]
    assert paging.gva2gpa_text(CountingMemory(ram), cpu, 0xC0012345) == "gpa: 0x5c0012345"
    assert paging.gva2gpa_text(CountingMemory(ram), cpu, 0x1_C0402ABC) == "gpa: 0x12345abc"   # low 32 bits
    # Without CR4.PSE the PS bit is ignored and the PDE is a table pointer (to frame 0xc0200: not RAM).
    nopse = CpuState(regs={**regs, "cr4": 0})
    assert lines(paging.info_tlb(CountingMemory(ram), nopse)) == ["00000000c0402000: 0000000012345000 ----A--U-"]
    assert paging.gva2gpa_text(CountingMemory(ram), nopse, 0xC0012345) == "Unmapped"


def test_pae_2m_prints_physical_address():
    """PAE 2 MiB: QEMU 7.2 would print 8000000000300000 here (mask ~0xfffff); we print bits 21..51.
    PAE 4 KiB likewise: QEMU prints 87f0000000009000 (mask ~0xfff); we print bits 12..51."""
    t = Tables()
    t.ram.ensure(0x50)
    t.link(0x50, 0x20 // 8 + 3, 0x51, P)       # CR3 = 0x50020: PDPTEs at offset 0x20; PDPT[3]
    t.set(0x51, 0, NX | 0x200000 | (1 << 20) | PS | A | P)
    t.link(0x51, 1, 0x52)
    t.set(0x52, 0, NX | (0x7F << 52) | 0x9000 | P | W)
    cpu = CpuState(regs={"cr0": PG | PE, "cr3": 0x50020, "cr4": CR4_PAE, "efer": 0x800})
    assert lines(paging.info_tlb(CountingMemory(t.ram), cpu)) == [
        "00000000c0000000: 0000000000200000 X-P-A----",
        "00000000c0200000: 0000000000009000 X-------W",
    ]
    assert paging.gva2gpa_text(CountingMemory(t.ram), cpu, 0xC0200010) == "gpa: 0x9010"
    assert paging.gva2gpa_text(CountingMemory(t.ram), cpu, 0xC0123456) == "gpa: 0x323456"
    assert lines(paging.info_mem(CountingMemory(t.ram), cpu)) == [
        "00000000c0000000-00000000c0200000 0000000000200000 -r-",
        "00000000c0200000-00000000c0201000 0000000000001000 -rw",
    ]
    assert paging.count_table_reads(CountingMemory(t.ram), cpu) == (3, 3)   # one run per level


def test_many_contiguous_page_tables_stream():
    """64 page tables in consecutive frames: one read_frames call per level, the PT level one run; 32768 lines
    stream out in VA order and `info mem` merges them into one range despite NX/A/D differences."""
    t = Tables()
    t.ram.ensure(0x100)
    t.link(0x100, 0, 0x200)
    t.link(0x200, 3, 0x300)
    for j in range(64):
        t.link(0x300, j, 0x400 + j)
        flags = (NX if j % 2 else 0) | (A | D if j % 3 else 0) | P | W
        t.ram.set_frame(0x400 + j, struct.pack("<512Q", *[((0x80000 + j * 512 + i) << 12) | flags
                                                          for i in range(512)]))
    cpu = CpuState(regs={"cr0": PG | PE, "cr3": 0x100000, "cr4": CR4_PAE, "efer": 0xD00})
    mem = CountingMemory(t.ram, cache=True)
    out = paging.info_tlb(mem, cpu)
    first = next(out)
    assert first == "00000000c0000000: 0000000080000000 --------W"
    rest = list(out)
    assert len(rest) == 64 * 512 - 1
    assert rest[-1] == "00000000c7fff000: 0000000087fff000 X-------W"
    assert (mem.calls, mem.frames, mem.runs) == (4, 67, 4)
    assert paging.count_table_reads(CountingMemory(t.ram), cpu) == (67, 4)
    assert list(paging.info_mem(CountingMemory(t.ram), cpu)) == [
        "00000000c0000000-00000000c8000000 0000000008000000 -rw"]


@pytest.mark.slow
def test_scale_one_million_pages():
    """1,000,000 mapped 4 KiB pages (1954 page tables + 4 directories, C-bit on two pages in three): 4 read_frames calls, and
    `info tlb` streams every line in a few seconds."""
    me = 1 << 47
    n = 1_000_000
    t = Tables()
    t.ram.ensure(0x1000)
    t.link(0x1000, 256, 0x1001, TBL | me)
    pts = (n + 511) // 512
    for d in range((pts + 511) // 512):
        t.link(0x1001, d, 0x1002 + d, TBL | me)
        for j in range(min(512, pts - d * 512)):
            k = d * 512 + j
            frame = 0x2000 + k
            t.link(0x1002 + d, j, frame, TBL | me)
            cnt = min(512, n - k * 512)
            t.ram.set_frame(frame, struct.pack("<512Q", *[
                ((0x100000 + k * 512 + i) << 12) | NX | D | A | W | P | (me if i % 3 else 0) for i in range(cnt)
            ], *[0] * (512 - cnt)))
    cpu = CpuState(regs={"cr0": PG | PE, "cr3": 0x1000000 | me, "cr4": CR4_PAE, "efer": 0xD00})
    mem = CountingMemory(t.ram, cache=True)
    count = 0
    last = ""
    for line in paging.info_tlb(mem, cpu, me):
        count += 1
        last = line
    assert count == n and mem.calls == 4 and mem.frames == 1 + 1 + 4 + pts
    assert last == f"ffff8000f423f000: {(0x100000 + n - 1) << 12:016x} X--DA---W"
    assert list(paging.info_mem(CountingMemory(t.ram), cpu, me)) == [
        f"ffff800000000000-ffff8000f4240000 {n * 4096:016x} -rw"]
