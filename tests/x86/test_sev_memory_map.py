"""The C-bit map on hand-built tables and on the real fixtures, in process (no daemon): ranges merged as
``info mem`` merges them, frames per attribute, aliases within one vCPU and across two; and its picture at the
two ends of the size range it promises (16 MiB, 64 GiB)."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest
from x86_testmem import CountingMemory, load_fixture, sev_copy

from sevmon.memory.ram import RAM
from sevmon.render.sev_memory_map_svg import render_svg, row_span
from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState
from sevmon.x86.sev_memory_map import SevMemoryMap, build_map

C = 1 << 47
P, RW, US, PS = 0x1, 0x2, 0x4, 0x80


def long_mode_cpu(index: int, cr3: int) -> CpuState:
    return CpuState(index, {"cr0": 0x80050033, "cr3": cr3 | C, "cr4": 0x3406E0, "efer": 0xD01})


def put(ram: RAM, table: int, index: int, entry: int) -> None:
    ram.write(table + 8 * index, struct.pack("<Q", entry))


def tables_4level(ram: RAM, root: int, pdpt: int, pd: int, pt: int) -> None:
    """root[0] -> pdpt[0] -> pd[2] -> pt: the PT maps VA 0x400000.., pd[3] is free for a 2 MiB page."""
    for t in (root, pdpt, pd, pt):
        ram.write(t, bytes(4096))
    put(ram, root, 0, pdpt | C | P | RW | US)
    put(ram, pdpt, 0, pd | C | P | RW | US)
    put(ram, pd, 2, pt | C | P | RW | US)


@pytest.mark.parametrize("name", ["linux-4level", "linux-pae", "linux-32bit"])
def test_fixture_as_sev_guest_is_all_private_and_merges_as_info_mem(name):
    ram, cpu, _hmp = load_fixture(name)
    if name != "linux-32bit":          # 32-bit entries have no C-bit: private without one
        ram, cpu = sev_copy(ram, cpu)
    mem = CountingMemory(ram)
    m = build_map(mem, [cpu], 0, C)
    assert [r.line() for r in m.ranges] == [f"{line} private" for line in paging.info_mem(mem, cpu, C)]
    assert m.shared == [] and m.aliases == [] and m.bytes_of(False) == 0
    frames = set()
    for leaf in paging.walk(mem, cpu, C):
        gpa = paging.translate(mem, cpu, leaf.va, C)[0]
        frames.update(range(gpa >> 12, (gpa + leaf.size) >> 12))
    assert m.mapped_frames == len(frames) == m.frames(m.private)


def test_alias_within_one_vcpu_inside_a_large_page():
    """A 2 MiB private page covers frame F; a 4 KiB shared leaf maps F too: exactly F is aliased."""
    ram = RAM(64 << 20)
    tables_4level(ram, 0x1000, 0x2000, 0x3000, 0x4000)
    put(ram, 0x3000, 3, 0x200000 | C | P | RW | PS)          # VA 0x600000 -> 0x200000..0x3fffff private
    put(ram, 0x4000, 0, 0x203000 | P | RW)                   # VA 0x400000 -> 0x203000 shared
    put(ram, 0x4000, 1, 0x500000 | C | P | RW)               # VA 0x401000 -> 0x500000 private
    m = build_map(CountingMemory(ram), [long_mode_cpu(0, 0x1000)], 0, C)
    assert [(r.start, r.size, r.private) for r in m.ranges] == [
        (0x400000, 0x1000, False), (0x401000, 0x1000, True), (0x600000, 0x200000, True)]
    assert m.aliased == [(0x203000, 0x1000)]
    (a,) = m.aliases
    assert (a.gpa, a.size, a.private, a.shared) == (0x203000, 0x1000, ((0, 0x603000),), ((0, 0x400000),))
    assert m.mapped_frames == 512 + 1 == m.frames(m.private) + m.frames(m.shared) - m.frames(m.aliased)


def test_alias_across_two_vcpus_and_a_twin_vcpu_counted_once():
    ram = RAM(64 << 20)
    tables_4level(ram, 0x1000, 0x2000, 0x3000, 0x4000)       # vCPU 0 (and vCPU 2, same CR3)
    tables_4level(ram, 0x11000, 0x12000, 0x13000, 0x14000)   # vCPU 1
    for i in range(4):                                       # frames 0x800000.. private on vCPU 0
        put(ram, 0x4000, i, (0x800000 + i * 0x1000) | C | P | RW | US)
    put(ram, 0x14000, 7, 0x802000 | P | RW)                  # vCPU 1: VA 0x407000 -> 0x802000 shared
    put(ram, 0x14000, 8, 0x803000 | P | RW)                  # ... and the next frame, contiguously
    cpus = [long_mode_cpu(0, 0x1000), long_mode_cpu(1, 0x11000), long_mode_cpu(2, 0x1000)]
    mem = CountingMemory(ram)
    m = build_map(mem, cpus, 0, C)
    assert m.aliased == [(0x802000, 0x2000)]
    (a,) = m.aliases                                          # one run of two frames, one view per vCPU
    assert (a.gpa, a.size, a.private, a.shared) == (0x802000, 0x2000, ((0, 0x402000),), ((1, 0x407000),))
    assert [r.private for r in m.ranges] == [True] and m.mapped_frames == 4
    m1 = build_map(mem, cpus, 1, C)                           # vCPU 1's ranges, the same frames and aliases
    assert [(r.start, r.size, r.private) for r in m1.ranges] == [(0x407000, 0x2000, False)]
    assert m1.aliases == m.aliases


def _svg_extents(svg: str) -> dict[str, list[tuple[int, int]]]:
    """Each category's rectangles merged into (gpa, size) runs, from the data the picture carries."""
    out: dict[str, list[tuple[int, int]]] = {}
    for el in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}rect"):
        cat = el.get("data-category")
        if cat is None:
            continue
        runs = out.setdefault(cat, [])
        gpa, size = int(el.get("data-gpa"), 16), int(el.get("data-size"), 16)
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((gpa, size))
    return out


@pytest.mark.parametrize("top", [16 << 20, 64 << 30])
def test_picture_is_readable_from_16_mib_to_64_gib(top):
    """At most 64 rows; GiB/MiB labels; one shared page and one aliased page at the far end still get a
    pixel each; the extents drawn are the map's."""
    page = 4096
    m = SevMemoryMap(0, True, private=[(0, top // 2)], shared=[(top // 2 + page, page), (top - 2 * page, page)],
                     aliased=[(top - 2 * page, page)])
    svg = render_svg(m, [(0, top - page)], top)
    root = ET.fromstring(svg)
    rows = top // row_span(top)
    assert rows <= 64
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    unit = "GiB" if top >= 1 << 30 else "MiB"
    assert f"{(rows - 1) * row_span(top) >> (30 if unit == 'GiB' else 20)} {unit}" in texts
    assert "legend:" in texts
    legend = [r.get("data-legend") for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("data-legend")]
    assert legend == ["not RAM", "not mapped", "private", "shared", "aliased"]
    ext = _svg_extents(svg)
    assert ext["private"] == [(0, top // 2)]
    assert ext["shared"] == [(top // 2 + page, page)]
    assert ext["aliased"] == [(top - 2 * page, page)]
    assert ext["not RAM"] == [(top - page, page)]
    assert ext["not mapped"] == [(top // 2, page), (top // 2 + 2 * page, top // 2 - 4 * page)]
    for el in root.iter("{http://www.w3.org/2000/svg}rect"):
        if el.get("data-category") in ("shared", "aliased"):
            assert float(el.get("width")) >= 1.0


def test_fragmented_map_is_drawn_to_the_pixel_and_stays_small():
    """20,000 alternating private/shared pages: pixel runs, each pixel the highest category in it."""
    page, top = 4096, 1 << 30
    private = [(i * 2 * page, page) for i in range(20000)]
    shared = [(i * 2 * page + page, page) for i in range(20000)]
    m = SevMemoryMap(0, True, private=private, shared=shared, aliased=[(top - page, page)])
    svg = render_svg(m, [(0, top)], top)
    assert len(svg) < 200_000
    ext = _svg_extents(svg)
    px = row_span(top) // 1024
    assert ext["shared"] == [(0, -(-40000 * page // px) * px)]      # shared outranks private in every pixel
    assert ext["aliased"] == [(top - px, px)]
    assert "private" not in ext


def test_a_map_too_big_for_one_qmp_reply_is_refused_in_one_line():
    from sevmon.commands.sev_memory_map import to_qmp
    from sevmon.errors import CommandError
    from sevmon.x86.sev_memory_map import VirtualRange

    m = SevMemoryMap(0, True, ranges=[VirtualRange(i << 13, (i << 13) + 4096, 4096, 7, bool(i & 1))
                                      for i in range(200_000)])
    none = m.frame_counts([], 0)
    with pytest.raises(CommandError) as e:
        to_qmp(m, [], none, False)
    assert e.value.desc == ("The map has 200000 ranges: more than one QMP reply may carry (8 MiB); "
                            "use 'info sev-mem' or 'sev-mem-map'")
    assert len(to_qmp(SevMemoryMap(0, True, ranges=m.ranges[:1000]), [], none, False)["ranges"]) == 1000


def test_alias_views_are_canonical_across_the_canonical_hole():
    """Shared leaves at raw VA 2^47 - 4 KiB and 2^47 map contiguous frames: the second is 0xffff800000000000."""
    ram = RAM(64 << 20)
    tables_4level(ram, 0x1000, 0x8000, 0x9000, 0xA000)
    put(ram, 0xA000, 0, 0x301000 | C | P | RW)                     # VA 0x400000 -> 0x301000 private
    for t in (0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000):
        ram.write(t, bytes(4096))
    put(ram, 0x1000, 255, 0x2000 | C | P | RW)
    put(ram, 0x2000, 511, 0x3000 | C | P | RW)
    put(ram, 0x3000, 511, 0x4000 | C | P | RW)
    put(ram, 0x4000, 511, 0x300000 | P | RW)                      # VA 0x7ffffffff000 -> 0x300000 shared
    put(ram, 0x1000, 256, 0x5000 | C | P | RW)
    put(ram, 0x5000, 0, 0x6000 | C | P | RW)
    put(ram, 0x6000, 0, 0x7000 | C | P | RW)
    put(ram, 0x7000, 0, 0x301000 | P | RW)                        # VA 0xffff800000000000 -> 0x301000 shared
    m = build_map(CountingMemory(ram), [long_mode_cpu(0, 0x1000)], 0, C)
    assert [a.shared for a in m.aliases] == [((0, 0xFFFF800000000000),)]
    assert m.shared == [(0x300000, 0x2000)] and m.aliased == [(0x301000, 0x1000)]
