"""The walkers against real QEMU 7.2 output (linux-4level, linux-pae, linux-32bit), plain and as SEV guests."""

from __future__ import annotations

import struct
from functools import cache

import pytest

from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState
from tests.x86.x86_testmem import CountingMemory, copy_ram, count_runs, load_fixture, ram_q, sev_copy

FIXTURES = ("linux-4level", "linux-pae", "linux-32bit")
# Cold `info tlb` through a run-grouping cache: (read_frames calls, distinct table pages, contiguous runs).
EXPECTED_READS = {"linux-4level": (4, 108, 33), "linux-pae": (3, 26, 21), "linux-32bit": (2, 15, 11)}


@cache
def _load(name: str):
    ram, cpu, hmp = load_fixture(name)
    return name, ram, cpu, hmp


@pytest.fixture(params=FIXTURES)
def fx(request):
    return _load(request.param)


@pytest.fixture(params=["linux-4level", "linux-pae"])
def fx64(request):
    """Fixtures with 8-byte entries (the C-bit applies)."""
    return _load(request.param)


def text(lines) -> str:
    return "".join(line + "\r\n" for line in lines)


def qemu_tlb(name: str, hmp: dict[str, str]) -> str:
    """QEMU's `info tlb`, with its PAE PA-column bug undone: bits 52..63 (NX) cleared on 2 MiB and 4 KiB lines."""
    out = hmp["info tlb"]
    if name != "linux-pae":
        return out
    lines = []
    for line in out.split("\r\n")[:-1]:
        pa = int(line[18:34], 16) & 0x000FFFFFFFFFF000
        line = f"{line[:18]}{pa:016x}{line[34:]}"
        lines.append(line)
    return text(lines)


def gva2gpa_samples(hmp: dict[str, str]):
    return [(int(k.split()[1], 0), v) for k, v in hmp.items() if k.startswith("gva2gpa ")]


def test_info_tlb(fx):
    name, ram, cpu, hmp = fx
    assert text(paging.info_tlb(CountingMemory(ram), cpu)) == qemu_tlb(name, hmp)


def test_pae_fixture_has_2m_nx_pages():
    """The PAE exception is exercised: QEMU printed NX in the PA column of 2 MiB and of 4 KiB lines; we do not."""
    name, ram, cpu, hmp = _load("linux-pae")
    big = [ln for ln in hmp["info tlb"].split("\r\n") if ln and ln[37] == "P"]
    assert len(big) == 122 and sum(ln[18] == "8" for ln in big) == 118
    small = [ln for ln in hmp["info tlb"].split("\r\n") if ln and ln[37] == "-"]
    assert any(ln[18] == "8" for ln in small)
    ours = list(paging.info_tlb(CountingMemory(ram), cpu))
    assert len(ours) == len(big) + len(small) and not any(ln[18] == "8" for ln in ours)


def test_info_mem(fx):
    _, ram, cpu, hmp = fx
    assert text(paging.info_mem(CountingMemory(ram), cpu)) == hmp["info mem"]


def test_gva2gpa(fx):
    _, ram, cpu, hmp = fx
    samples = gva2gpa_samples(hmp)
    assert len(samples) == 15
    mem = CountingMemory(ram)
    for va, want in samples:
        assert paging.gva2gpa_text(mem, cpu, va) + "\r\n" == want, hex(va)


def test_walk_agrees_with_info_tlb(fx):
    _, ram, cpu, hmp = fx
    maps = list(paging.walk(CountingMemory(ram), cpu))
    lines = list(paging.info_tlb(CountingMemory(ram), cpu))
    assert len(maps) == len(lines)
    assert [m.va for m in maps] == [int(ln[:16], 16) for ln in lines]
    assert all(m.private for m in maps)
    assert [m.va for m in maps] == sorted(m.va for m in maps)


def test_level_batched_reads(fx):
    """Cold `info tlb`: one read_frames call per level, each a sorted distinct list of frames that exist in the
    sparse core (which holds exactly the tables), never a byte read; counts match count_table_reads."""
    name, ram, cpu, _ = fx
    mem = CountingMemory(ram, cache=True)
    for _line in paging.info_tlb(mem, cpu):
        pass
    calls, pages, runs = EXPECTED_READS[name]
    assert (mem.calls, mem.frames, mem.runs) == (calls, pages, runs)
    for req in mem.requests:
        assert req == sorted(set(req))
        assert all(ram.has(f) for f in req)
    assert len(mem.distinct) == pages
    assert mem.byte_reads == 0
    assert paging.count_table_reads(CountingMemory(ram), cpu) == (pages, runs)
    if name == "linux-4level":
        assert runs <= 33 and pages <= 108


@pytest.mark.parametrize("cbit", [47, 51])
def test_sev_copy_same_output(fx64, cbit):
    name, ram, cpu, hmp = fx64
    me = 1 << cbit
    sram, scpu = sev_copy(ram, cpu, cbit)
    assert scpu.cr3 & me
    mem = CountingMemory(sram, cache=True)
    assert text(paging.info_tlb(mem, scpu, me)) == qemu_tlb(name, hmp)
    assert (mem.calls, mem.frames, mem.runs) == EXPECTED_READS[name]
    assert text(paging.info_mem(CountingMemory(sram), scpu, me)) == hmp["info mem"]
    for va, want in gva2gpa_samples(hmp):
        assert paging.gva2gpa_text(mem, scpu, va, me) + "\r\n" == want, hex(va)
        r = paging.translate(mem, scpu, va, me)
        assert r is None or r[1] is True
    maps = list(paging.walk(CountingMemory(sram), scpu, me))
    assert all(m.private and not m.entry & me for m in maps)
    unmasked = text(paging.info_tlb(CountingMemory(sram), scpu))
    if cbit == 47 or name == "linux-pae":
        # Without the mask the C-bit is taken for an address bit: the walk goes astray (47), or it shows in
        # the PAE 4 KiB PA column, which keeps bits 12..63 (51).
        assert unmasked != qemu_tlb(name, hmp)
    else:
        # Bit 51 is outside the monitor walkers' 0x3fffffffff000 mask (upstream "happens to work", as the
        # research notes say), but gva2gpa's PG_ADDRESS_MASK keeps it: unmasked translation fails.
        assert unmasked == qemu_tlb(name, hmp)
        va, want = gva2gpa_samples(hmp)[0]
        assert paging.gva2gpa_text(mem, scpu, va) + "\r\n" != want


def test_sev_shared_leaves_reported(fx64):
    """Leaves without the C-bit are shared pages: reported private=False, same text."""
    name, ram, cpu, hmp = fx64
    me = 1 << 47
    sram, scpu = sev_copy(ram, cpu, 47)
    plain = list(paging.walk(CountingMemory(ram), cpu))
    # clear the C-bit in the leaf entry of every 7th mapping
    shared = set()
    for m in plain[::7]:
        addr = _leaf_entry_addr(sram, scpu, m.va, me)
        e = ram_q(sram, addr)
        sram.write(addr, struct.pack("<Q", e & ~me))
        shared.add(m.va)
    maps = list(paging.walk(CountingMemory(sram), scpu, me))
    assert [(m.va, m.entry, m.pa) for m in maps] == [(m.va, m.entry, m.pa) for m in plain]
    assert {m.va for m in maps if not m.private} == shared
    mem = CountingMemory(sram)
    for m in maps[::50]:
        assert paging.translate(mem, scpu, m.va + 8, me)[1] == m.private
    assert text(paging.info_tlb(CountingMemory(sram), scpu, me)) == qemu_tlb(name, hmp)


def _leaf_entry_addr(ram, cpu, va, me):
    """Guest-physical address of the leaf entry mapping ``va`` (test-side, 8-byte reads)."""
    mode = cpu.paging_mode()
    if mode == "pae":
        addr = ((cpu.cr3 & ~me) & ~0x1F) + ((va >> 30) & 3) * 8
        shifts = [21, 12]
    else:
        addr = (cpu.cr3 & ~me & 0x3FFFFFFFFF000) + ((va >> 39) & 0x1FF) * 8
        shifts = [30, 21, 12]
    for shift in shifts:
        e = ram_q(ram, addr) & ~me
        addr = (e & 0x3FFFFFFFFF000) + ((va >> shift) & 0x1FF) * 8
        if shift != 12:
            nxt = ram_q(ram, addr) & ~me
            if nxt & 0x80:
                return addr
    return addr


def test_32bit_ignores_me_mask():
    """32-bit legacy paging has 4-byte entries and no C-bit: me_mask passes through untouched."""
    name, ram, cpu, hmp = _load("linux-32bit")
    me = 1 << 47
    assert text(paging.info_tlb(CountingMemory(ram), cpu, me)) == hmp["info tlb"]
    assert text(paging.info_mem(CountingMemory(ram), cpu, me)) == hmp["info mem"]
    for va, want in gva2gpa_samples(hmp):
        assert paging.gva2gpa_text(CountingMemory(ram), cpu, va, me) + "\r\n" == want
    # a 32-bit CR3 or entry bit in the mask's position would be used as-is: nothing is stripped
    assert paging.translate(CountingMemory(ram), cpu, 0xC124F718, 1 << 12) == (0x124F718, True)
    assert all(m.private for m in paging.walk(CountingMemory(ram), cpu, me))


def test_paging_off(fx):
    _, ram, cpu, _ = fx
    off = CpuState(regs=dict(cpu.regs))
    off.set("cr0", cpu.cr0 & ~(1 << 31))
    mem = CountingMemory(ram)
    assert list(paging.info_tlb(mem, off)) == ["PG disabled"]
    assert list(paging.info_mem(mem, off)) == ["PG disabled"]
    assert list(paging.walk(mem, off)) == []
    assert paging.count_table_reads(mem, off) == (0, 0)
    assert paging.translate(mem, off, 0x1234567, 1 << 47) == (0x1234567, True)
    assert paging.gva2gpa_text(mem, off, 0) == "gpa: 0"
    assert paging.gva2gpa_text(mem, off, 0xABC) == "gpa: 0xabc"
    assert mem.calls == 0


def test_absent_tables_read_as_zero(fx):
    """A table frame the memory layer does not return is an all-zero table (QEMU reads unassigned as 0)."""
    _, ram, cpu, _ = fx
    maps = list(paging.walk(CountingMemory(ram), cpu))
    mem = CountingMemory(ram, cache=True)
    list(paging.walk(mem, cpu))
    victim = mem.requests[-1][0]        # first table of the last level
    ram2 = copy_ram(ram)
    ram2.drop(victim)
    maps2 = list(paging.walk(CountingMemory(ram2), cpu))
    assert 0 < len(maps) - len(maps2)
    assert set((m.va, m.entry) for m in maps2) <= set((m.va, m.entry) for m in maps)
    assert count_runs([]) == 0
