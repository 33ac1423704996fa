"""x86 page-table walkers: ``info tlb``, ``info mem`` and ``gva2gpa`` with QEMU 7.2's text.

One walker per paging mode (32-bit with optional 4 MiB PSE pages, PAE, 4-level, 5-level), described as data
(:mod:`sevmon.x86.modes`) and run by one shared engine, the way ``target/i386/monitor.c`` keeps its walkers side by side
over one line printer and one range merger.

Two things QEMU does not do, and why:

* **The SEV C-bit.** An SEV guest sets the C-bit (``me_mask`` = ``1 << cbitpos``) in CR3 and in the entries it
  wants private. It is an attribute, not address: the walker strips it from CR3 and from every 64-bit entry
  before the entry is used as an address or printed, and reports per leaf whether it was set (a leaf without it
  maps a *shared* page, which must be read without decryption). 32-bit legacy paging has 4-byte entries and no
  C-bit: ``me_mask`` is ignored there and every page is private. With ``me_mask == 0`` (not an SEV guest) every
  page is reported private, i.e. "read with the default attributes".
* **Level-batched reads.** On SEV every table read is a firmware round trip, so the tables are read breadth-first:
  the root in one call, then *all* next-level tables of a level in one ``mem.read_frames`` call, so the layer
  below can merge contiguous frames into one request each. The lines are then produced depth-first from the
  tables in hand, in VA order, as generators: memory is O(tables), never O(lines).

QEMU bugs deliberately not copied: the PAE ``info tlb`` physical-address column (QEMU 7.2 keeps NX and bits
52..63 there, on 2 MiB and 4 KiB lines alike; we print bits 21..51 / 12..51, the address), and LA57 ``info mem``
(QEMU inverts two present checks; we apply the 4-level rules with the final flush at 2^57).
"""

from __future__ import annotations

import array
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from sevmon.debug import PhysicalMemory
from sevmon.x86.cpu import CR4_PSE, CpuState
from sevmon.x86.modes import MONITOR_TABLE_MASK, PagingMode, mode_of
from sevmon.x86.pte import PG_ADDRESS_MASK, PG_PRESENT, PG_PSE, PG_RW, PG_USER

__all__ = [
    "Mapping", "walk", "info_tlb", "info_mem", "info_tlb_text", "info_mem_text", "tables_unchanged", "translate",
    "gva2gpa_text", "count_table_reads",
]

PROT_MASK = PG_USER | PG_RW | PG_PRESENT

_U64 = (1 << 64) - 1
_PAGE = 4096

_unpack512 = struct.Struct("<512Q").unpack
_unpack1024 = struct.Struct("<1024I").unpack
_ENTRY = {8: struct.Struct("<Q"), 4: struct.Struct("<I")}


@dataclass(frozen=True, slots=True)
class Mapping:
    """One leaf, as ``info tlb`` prints it.

    ``pa`` is the *printed* physical-address column (QEMU's per-mode mask: in 32-bit modes bit 21 of a 4 MiB
    PDE stays, PSE-36 bits go); use :func:`translate` for the address the CPU would use.
    """

    va: int        #: canonical virtual address of the page
    entry: int     #: leaf entry with the C-bit stripped, flags intact (PS/PAT included)
    pa: int        #: physical-address column of ``info tlb``
    size: int      #: page size: 4 KiB, 2 MiB, 4 MiB or 1 GiB
    prot: int      #: U|W|P ANDed down the walk, as ``info mem`` computes it
    private: bool  #: the leaf had the C-bit (always True without one: 32-bit paging or ``me_mask == 0``)


def _canon(mode: PagingMode, addr: int) -> int:
    """QEMU's ``addr_canonical``: sign-extend from bit 47 (bit 56 under LA57); legacy modes never are."""
    b = mode.canon_bit
    if b and addr >> b & 1:
        return (addr | -(1 << (b + 1))) & _U64
    return addr


# -- level-batched table reads -------------------------------------------------------------------------------
class _Tables:
    """Every table reachable from CR3, read breadth-first: one ``read_frames`` call per level.

    ``frames`` maps frame number → bytes, or None for a frame the memory layer did not return (not RAM: reads
    as an all-zero table). A frame reached at several levels (or from several entries) is read once.
    """

    __slots__ = ("mode", "me", "root", "root_raw", "frames", "requests")

    def __init__(self, mem: PhysicalMemory, mode: PagingMode, cr3: int, me_mask: int):
        self.mode = mode
        self.me = me = me_mask if mode.wide else 0
        self.frames: dict[int, bytes | None] = {}
        self.requests: list[list[int]] = []
        cr3 &= ~me
        if mode.name == "pae":
            base = cr3 & ~0x1F & _U64          # 4 PDPTEs, 32-byte aligned
        elif mode.wide:
            base = cr3 & MONITOR_TABLE_MASK
        else:
            base = cr3 & 0xFFFFF000
        self._fetch(mem, [base >> 12])
        data = self.frames[base >> 12]
        if mode.name == "pae":
            self.root = struct.unpack_from("<4Q", data, base & 0xFFF) if data else (0,) * 4
            self.root_raw = b""
        else:
            self.root = self.unpack(data)
            self.root_raw = data or b""
        tmask = mode.table_mask
        nme = ~me
        level: list[int] = []       # frames of the current level (below the root)
        esize = 8 if mode.wide else 4
        entry_fmt = "<Q" if mode.wide else "<I"
        for depth, lvl in enumerate(mode.levels[:-1]):
            ps_leaf = PG_PSE if lvl.leaf_mask else 0
            nxt: set[int] = set()
            if depth == 0:
                for e in self.root:
                    if e & PG_PRESENT and not e & ps_leaf:
                        nxt.add((e & nme & tmask) >> 12)
            else:
                # Only the entries that point to tables are visited: their low byte says so
                # (P set, PS clear where PS makes a leaf), found in C from the raw page.
                pointers = _POINTS_DOWN[1 if ps_leaf else 0]
                for d in map(self.frames.__getitem__, level):
                    if d is None or d == _ZERO_PAGE:    # one memcmp: most tables of a kernel are empty
                        continue
                    for hit in _ONES.finditer(d[::esize].translate(pointers)):
                        e = struct.unpack_from(entry_fmt, d, hit.start() * esize)[0]
                        nxt.add((e & nme & tmask) >> 12)
            if not nxt:
                break
            level = sorted(nxt)
            self._fetch(mem, [f for f in level if f not in self.frames])

    def _fetch(self, mem: PhysicalMemory, pfns: list[int]) -> None:
        if not pfns:
            return
        self.requests.append(pfns)
        got = mem.read_frames(pfns)
        for f in pfns:
            d = got.get(f)
            self.frames[f] = bytes(d) if d is not None and len(d) >= _PAGE else None

    def unpack(self, data: bytes | None) -> tuple[int, ...]:
        if data is None:
            return ()
        return _unpack512(data) if self.mode.wide else _unpack1024(data)

    def leaves(self) -> Iterator[tuple[int, int, int, int, bool]]:
        """Leaves in VA order as ``(raw va, entry without C-bit, level index, prot, private)``."""
        me = self.me
        for item in self.chunks():
            if type(item) is _LeafRun:
                base, depth, pprot, raw, start, stop = item
                entries = self.unpack(raw)
                shift = self.mode.levels[depth].shift
                for i in range(start, stop):
                    e = entries[i]
                    c = e & me
                    e ^= c
                    yield base + (i << shift), e, depth, e & pprot, c != 0 or not me
                continue
            if type(item) is not _LeafTable:
                yield item
                continue
            base, depth, pprot, raw = item
            entries = self.unpack(raw)
            # 4 KiB leaf table: the hot loop (a million iterations for a million pages).
            if me:
                for i, e in enumerate(entries):
                    if e & PG_PRESENT:
                        c = e & me
                        yield base + (i << 12), e ^ c, depth, e & pprot, c != 0
            else:
                for i, e in enumerate(entries):
                    if e & PG_PRESENT:
                        yield base + (i << 12), e, depth, e & pprot, True

    def chunks(self):
        """VA-ordered walk output: runs of large leaves as ``_LeafRun`` (or, under a root read without its
        page, ``(va, entry, depth, prot, private)`` tuples), and whole 4 KiB leaf tables as ``_LeafTable``,
        so a consumer can process them in one tight loop (or in C, from their raw bytes) instead of one
        generator step per page. Built as one list (a few items per table, O(tables) like the frames themselves):
        appending costs less than resuming a chain of nested generators once per item."""
        out: list = []
        self._descend(out.append, 0, 0, PROT_MASK, self.root_raw, self.root)
        return iter(out)

    def _descend(self, put, depth: int, base: int, pprot: int, raw: bytes, entries: tuple[int, ...] = ()) -> None:
        """``put`` the chunks under one table: from its page ``raw`` (entries unpacked only where needed), or from
        ``entries`` alone (PAE's four PDPTEs)."""
        levels = self.mode.levels
        me = self.me
        shift = levels[depth].shift
        if depth == len(levels) - 1:
            put(_LeafTable(base, depth, pprot, raw))
            return
        lvl = levels[depth]
        ps_leaf = PG_PSE if lvl.leaf_mask else 0
        tmask = self.mode.table_mask
        frames = self.frames
        if raw:
            # Visit only the present entries, found in C from their low bytes (most of a table is empty);
            # consecutive large leaves go up as one _LeafRun (a direct map is thousands of them).
            kinds = raw[::self.mode.entry_size].translate(_ENTRY_KINDS[1 if ps_leaf else 0])
            for first, stop in _equal_runs(kinds):
                if kinds[first] == 1:   # pointers
                    self._pointers(put, depth, raw, base, pprot, first, stop)
                else:
                    put(_LeafRun(base, depth, pprot, raw, first, stop))
            return
        for i, e in enumerate(entries):
            if not e & PG_PRESENT:
                continue
            c = e & me
            e ^= c
            va = base + (i << shift)
            if e & ps_leaf:
                put((va, e, depth, e & pprot, c != 0 or not me))
                continue
            data = frames.get((e & tmask) >> 12)
            if data is not None:
                self._descend(put, depth + 1, va, pprot & e if lvl.ands_prot else pprot, data)

    def _pointers(self, put, depth: int, raw: bytes, base: int, pprot: int, first: int, stop: int) -> None:
        """Descend through the entries ``first..stop-1`` of a non-leaf table, all pointers to next-level tables."""
        lvl = self.mode.levels[depth]
        shift = lvl.shift
        nme = ~self.me
        tmask = self.mode.table_mask
        frames = self.frames
        esize = self.mode.entry_size
        entry = _ENTRY[esize].unpack_from
        leaf_below = depth + 2 == len(self.mode.levels)
        for i in range(first, stop):
            e = entry(raw, i * esize)[0] & nme
            va = base + (i << shift)
            data = frames.get((e & tmask) >> 12)
            # an empty non-leaf table adds nothing: one memcmp instead of a call that scans it
            if data is not None and (leaf_below or data != _ZERO_PAGE):
                self._descend(put, depth + 1, va, pprot & e if lvl.ands_prot else pprot, data)


def _tables(mem: PhysicalMemory, cpu: CpuState, me_mask: int) -> _Tables | None:
    mode = mode_of(cpu)
    return None if mode is None else _Tables(mem, mode, cpu.cr3, me_mask)


# -- public API ----------------------------------------------------------------------------------------------
def walk(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0) -> Iterator[Mapping]:
    """Every leaf mapping of ``cpu``'s current paging mode, in VA order (nothing when paging is off).

    All tables are read (level-batched) before the first mapping is yielded; mappings are then produced lazily.
    """
    t = _tables(mem, cpu, me_mask)
    if t is None:
        return
    levels = t.mode.levels
    mode = t.mode
    for va, e, depth, prot, private in t.leaves():
        lvl = levels[depth]
        yield Mapping(_canon(mode, va), e, e & lvl.leaf_mask, 1 << lvl.shift, prot, private)


def _flag_table() -> tuple[str, ...]:
    """``print_pte``'s 9 flag letters X G P D A C T U W, indexed by (NX >> 54) | (entry & 0x1fe)."""
    out = []
    for k in range(1024):
        out.append("".join(ch if k & bit else "-" for ch, bit in (
            ("X", 0x200), ("G", 0x100), ("P", 0x80), ("D", 0x40), ("A", 0x20),
            ("C", 0x10), ("T", 0x08), ("U", 0x04), ("W", 0x02))))
    return tuple(out)


_FLAGS = _flag_table()


class _LeafRun(NamedTuple):
    """Consecutive present large leaves, entries ``start`` to ``stop`` of the table ``raw`` at ``depth``."""

    base: int
    depth: int
    pprot: int
    raw: bytes
    start: int
    stop: int


class _LeafTable(NamedTuple):
    """One 4 KiB-leaf table of the walk: its VA and raw page bytes (entries with the C-bit still set)."""

    base: int
    depth: int
    pprot: int
    raw: bytes


# info mem: a present entry's low byte -> its U|W|P ANDed with the parent prot; absent -> 0
_PROT_CODES = [bytes((b & p & PROT_MASK) if b & PG_PRESENT else 0 for b in range(256)) for p in range(8)]
# walk: a low byte -> 1 if the entry points to a next-level table ([0]: PS ignored, [1]: PS = leaf)
_POINTS_DOWN = [bytes(1 if b & PG_PRESENT else 0 for b in range(256)),
                bytes(1 if b & PG_PRESENT and not b & PG_PSE else 0 for b in range(256))]
_ONES = re.compile(rb"\x01")
# _descend: a low byte -> 0 absent, 1 points to a table, 2 large leaf ([0]: PS ignored, [1]: PS = leaf)
_ENTRY_KINDS = [bytes(1 if b & PG_PRESENT else 0 for b in range(256)),
                bytes((2 if b & PG_PSE else 1) if b & PG_PRESENT else 0 for b in range(256))]
_NONZERO = bytes([0] + [1] * 255)
_ZERO_PAGE = bytes(_PAGE)


def _equal_runs(codes: bytes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal non-zero bytes in ``codes``, in order.

    What ``re.finditer(rb"([\x01-\xff])\1*")`` finds, at C speed per table rather than a regex step per byte
    (a page-table walk scans tens of thousands of entries, most of them in long equal runs): a table of one
    code is one ``count``; otherwise the neighbours' XOR (one big-int operation) marks each boundary with a
    non-zero byte, and ``find`` jumps from boundary to boundary."""
    n = len(codes)
    if not n:
        return []
    c = codes[0]
    if codes.count(c) == n:
        return [(0, n)] if c else []
    marks = (int.from_bytes(codes[1:], "big") ^ int.from_bytes(codes[:-1], "big")).to_bytes(
        n - 1, "big").translate(_NONZERO)
    find = marks.find
    runs = []
    start = 0
    i = find(1)
    while i >= 0:
        if codes[start]:
            runs.append((start, i + 1))
        start = i + 1
        i = find(1, start)
    if codes[start]:
        runs.append((start, n))
    return runs
_LOW_DIGITS: dict[tuple[int, int], list[str]] = {}


def _low_digits(span_base: int, n: int) -> list[str]:
    """The low 6 hex digits of ``span_base + (i << 12)`` for i < n (cached per table span)."""
    key = (span_base, n)
    low = _LOW_DIGITS.get(key)
    if low is None:
        low = _LOW_DIGITS[key] = [f"{span_base | (i << 12):06x}" for i in range(n)]
    return low


_PROT_TEXT = tuple(f"{'u' if p & PG_USER else '-'}r{'w' if p & PG_RW else '-'}" for p in range(8))
_PRE = b"\x00" * 10   # stands for a table's top 10 VA digits in a cached template

# -- whole 4 KiB tables of 8-byte entries rendered by C loops: fixed-width lines in a cached per-span template,
# each column filled by one strided slice assignment (a table's 512 lines cost a few dozen C calls, not 512
# formatted strings; 10,000 lines of a Linux guest's info tlb take a millisecond, not tens)
_LITTLE = sys.byteorder == "little"
_TLB_W = 45   # "%016x: %016x XGPDACTUW\n"
_TLB_TEMPLATES: dict[int, bytes] = {}
# info tlb's flag columns a 4 KiB leaf can fill: (column, entry byte, bit, letter); P stays '-' (PAT is not PS)
_TLB_COLUMNS = tuple((35 + col, byte, bit, bytes(ord(ch) if b & bit else ord("-") for b in range(256)))
                     for col, byte, bit, ch in ((0, 7, 0x80, "X"), (1, 1, 0x01, "G"), (3, 0, 0x40, "D"),
                                                (4, 0, 0x20, "A"), (5, 0, 0x10, "C"), (6, 0, 0x08, "T"),
                                                (7, 0, 0x04, "U"), (8, 0, 0x02, "W")))
_PRESENT_BYTE = bytes(b & PG_PRESENT for b in range(256))
_PRESENT_RUNS = re.compile(rb"\x01+")
_REPEATED: dict[int, int] = {}


def _repeated(value: int, n: int) -> int:
    """``n`` 64-bit copies of ``value`` side by side in one integer (a mask for n big-endian entries at once)."""
    rep = _REPEATED.get(value << 10 | n)
    if rep is None:
        rep = _REPEATED[value << 10 | n] = int.from_bytes(value.to_bytes(8, "big") * n, "big")
    return rep


_RAMPS: dict[int, int] = {}
_TLB_RUN_COLUMNS = ((37, 0, 0x80, bytes(ord("P") if b & 0x80 else ord("-") for b in range(256))), *_TLB_COLUMNS)


def _tlb_run_text(va: int, raw: bytes, pa_mask: int, shift: int) -> str:
    """``info tlb``'s lines for consecutive present large leaves (``raw``: their 8-byte entries), the first at
    canonical VA ``va``, each ``1 << shift`` further (a table's leaves never carry past bit 63)."""
    n = len(raw) >> 3
    ramp = _RAMPS.get(n)
    if ramp is None:  # entry i holds i, as n big-endian 64-bit fields
        ramp = _RAMPS[n] = int.from_bytes(b"".join(i.to_bytes(8, "big") for i in range(n)), "big")
    vas = (va * _repeated(1, n) + (ramp << shift)).to_bytes(n << 3, "big").hex().encode()
    be = array.array("Q", raw)
    if _LITTLE:
        be.byteswap()
    pa = (int.from_bytes(be, "big") & _repeated(pa_mask, n)).to_bytes(n << 3, "big").hex().encode()
    buf = bytearray(b"0000000000000000: 0000000000000000 ---------\n" * n)
    for k in range(16):
        buf[k::_TLB_W] = vas[k::16]
        buf[18 + k::_TLB_W] = pa[k::16]
    for col, byte, _bit, letters in _TLB_RUN_COLUMNS:
        buf[col::_TLB_W] = raw[byte::8].translate(letters)
    return buf.decode("ascii")


def _tlb_template(span_base: int) -> bytes:
    """The 512 lines of a 4 KiB table at ``span_base`` (its VA's low 6 digits), PA zero, flags '-', with
    ``_PRE`` for the table's top 10 VA digits (cached per span)."""
    text = _TLB_TEMPLATES.get(span_base)
    if text is None:
        text = _TLB_TEMPLATES[span_base] = b"".join(
            b"%s%06x: 0000000000000000 ---------\n" % (_PRE, span_base | (i << 12)) for i in range(512))
    return text


def _tlb_table_text(base: int, raw: bytes, pa_mask: int) -> str:
    """``info tlb``'s lines for the present entries of one 4 KiB leaf table of 512 8-byte entries at canonical
    VA ``base``: ``%016x: %016x XGPDACTUW`` with the PA column ``entry & pa_mask``."""
    present = raw[::8].translate(_PRESENT_BYTE)
    if b"\x01" not in present:
        return ""
    be = array.array("Q", raw)
    if _LITTLE:
        be.byteswap()  # each entry big-endian, in table order: its hex is its %016x
    pa = (int.from_bytes(be, "big") & _repeated(pa_mask, 512)).to_bytes(4096, "big").hex().encode()
    buf = bytearray(_tlb_template(base & 0xFFFFFF).replace(_PRE, b"%010x" % (base >> 24)))
    for k in range(16):
        buf[18 + k::_TLB_W] = pa[k::16]
    for col, byte, _bit, letters in _TLB_COLUMNS:
        buf[col::_TLB_W] = raw[byte::8].translate(letters)
    if b"\x00" not in present:
        return buf.decode("ascii")
    view = memoryview(buf)
    return b"".join([view[s * _TLB_W:e * _TLB_W] for s, e in map(re.Match.span, _PRESENT_RUNS.finditer(present))]
                    ).decode("ascii")


_MEM_W = 55   # "%016x-%016x %016x urw\n"
_MEM_SINGLES: dict[int, bytes] = {}
_MEM_U = bytes(ord("u") if b & PG_USER else ord("-") for b in range(256))
_MEM_W_LETTER = bytes(ord("w") if b & PG_RW else ord("-") for b in range(256))


def _singles_template(span_base: int, n: int) -> bytes:
    """The lines of entries 1..n-2 of a table of one-page ranges, prot ``-r-``, with ``_PRE`` for the table's top
    VA digits (cached per span)."""
    key = span_base << 11 | n
    text = _MEM_SINGLES.get(key)
    if text is None:
        text = _MEM_SINGLES[key] = b"".join(
            b"%s%06x-%s%06x %016x -r-\n" % (_PRE, span_base | (k << 12), _PRE, span_base | ((k + 1) << 12), 4096)
            for k in range(1, n - 1))
    return text


def _singles_text(base: int, codes: bytes) -> str:
    """``info mem``'s lines for entries 1..n-2 of a table of one-page ranges (``codes``: each entry's prot)."""
    n = len(codes)
    buf = bytearray(_singles_template(base & 0xFFFFFF, n).replace(_PRE, b"%010x" % (base >> 24)))
    middle = codes[1:n - 1]
    buf[51::_MEM_W] = middle.translate(_MEM_U)
    buf[53::_MEM_W] = middle.translate(_MEM_W_LETTER)
    return buf.decode("ascii")


# ``%016x`` of n 4 KiB pages, for the sizes a leaf table's ranges can have (at most 1024 entries)
_SIZE_TEXT = tuple(f"{n << 12:016x}" for n in range(1025))


def _lines(blocks: Iterator[str]) -> Iterator[str]:
    """Lines (no terminators) of text blocks of whole ``\\n``-terminated lines."""
    for block in blocks:
        yield from block.split("\n")[:-1]


def info_tlb(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0) -> Iterator[str]:
    """``info tlb``: one ``%016x: %016x XGPDACTUW`` line per leaf (no line terminators), or ``PG disabled``."""
    return _lines(info_tlb_text(mem, cpu, me_mask))


def info_mem(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0) -> Iterator[str]:
    """``info mem``'s lines (no line terminators), or ``PG disabled``: see :func:`info_mem_text`."""
    return _lines(info_mem_text(mem, cpu, me_mask))


def info_tlb_text(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0, *,
                  tables: list | None = None) -> Iterator[str]:
    """``info tlb``'s text in blocks of whole ``\\n``-terminated lines (a 4 KiB leaf table's in one block), what the
    monitor prints: one ``%016x: %016x XGPDACTUW`` line per leaf, or ``PG disabled``. ``tables``: a list the walk's
    tables are appended to (:func:`tables_unchanged`)."""
    t = _tables(mem, cpu, me_mask)
    if tables is not None:
        tables.append(t)
    if t is None:
        yield "PG disabled\n"
        return
    mode = t.mode
    last = len(mode.levels) - 1
    masks = [lvl.leaf_mask for lvl in mode.levels]
    cbit = mode.canon_bit
    sext = -(1 << (cbit + 1)) & _U64 if cbit else 0
    flags = _FLAGS
    pa4k = masks[last] & ~t.me & _U64
    nme = ~t.me
    shifts = [lvl.shift for lvl in mode.levels]
    wide = mode.wide
    for item in t.chunks():
        if type(item) is _LeafTable:
            # a whole 4 KiB table at once; print_pte(..., pte & ~PG_PSE_MASK, ...): PAT is not "P"
            base = item.base
            if cbit and base >> cbit & 1:
                base |= sext
            if wide and len(item.raw) == _PAGE:
                if text := _tlb_table_text(base, item.raw, pa4k):
                    yield text
                continue
            # The VA of entry i is base + (i << 12): its top 10 hex digits are the table's, the low 6
            # come from a per-span cache, so each line costs one hex conversion (the PA), not two.
            entries = t.unpack(item.raw)
            pre, low = f"{base:016x}"[:10], _low_digits(base & 0xFFFFFF, len(entries))
            text = "".join([f"{pre}{low[i]}: {e & pa4k:016x} {flags[((e >> 54) & 0x200) | (e & 0x17E)]}\n"
                            for i, e in enumerate(entries) if e & PG_PRESENT])
            if text:
                yield text
            continue
        if type(item) is _LeafRun:
            base, depth, _pprot, raw, start, stop = item
            shift, mask = shifts[depth], masks[depth] & nme
            if wide:
                va = base + (start << shift)
                if cbit and va >> cbit & 1:
                    va |= sext
                yield _tlb_run_text(va, raw[start << 3:stop << 3], mask & _U64, shift)
                continue
            entries = t.unpack(raw)
            lines = []
            for i in range(start, stop):
                va = base + (i << shift)
                if cbit and va >> cbit & 1:
                    va |= sext
                e = entries[i]
                lines.append(f"{va:016x}: {e & mask:016x} {flags[((e >> 54) & 0x200) | (e & 0x1FE)]}\n")
            yield "".join(lines)
            continue
        va, e, depth, _prot, _priv = item
        if cbit and va >> cbit & 1:
            va |= sext
        yield f"{va:016x}: {e & masks[depth]:016x} {flags[((e >> 54) & 0x200) | (e & 0x1FE)]}\n"


def info_mem_text(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0, *,
                  tables: list | None = None) -> Iterator[str]:
    """``info mem``'s text in blocks of whole ``\\n``-terminated lines: ranges merged while U/W/P stay equal (QEMU's
    ``mem_print``), or ``PG disabled``.

    Ranges run in raw (unextended) VA order, so a range can cross the canonical hole; start, end and size are
    each canonicalized only when printed, and the range that reaches the top ends at 2^32, 2^48 or 2^57.
    Physical contiguity, NX, G, D, A, PCD and PWT never split a range. ``tables`` as for :func:`info_tlb_text`.
    """
    t = _tables(mem, cpu, me_mask)
    if tables is not None:
        tables.append(t)
    if t is None:
        yield "PG disabled\n"
        return
    mode = t.mode
    shifts = [lvl.shift for lvl in mode.levels]

    cbit = mode.canon_bit
    sext = -(1 << (cbit + 1)) & _U64 if cbit else 0
    ptext = _PROT_TEXT

    def line(start: int, end: int, prot: int) -> str:
        size = end - start
        if sext:    # _canon of each, inline (a hundred lines per walk of a Linux guest)
            if start >> cbit & 1:
                start |= sext
            if end >> cbit & 1:
                end |= sext
            if size >> cbit & 1:
                size |= sext
        return f"{start:016x}-{end:016x} {size:016x} {ptext[prot & PROT_MASK]}\n"

    start = -1
    end = 0
    cur = 0
    # QEMU calls mem_print for every visited entry, with prot 0 for absent ones, then flushes at the top of VA
    # space. The leaves alone carry the same information: a range ends where the next leaf is not adjacent
    # (an absent entry starts there) or changes prot, and the last one ends at its own end (2^32, 2^48 or 2^57
    # when it reaches the top). Present leaves always have prot != 0 (P is set all the way down).
    esize = 8 if mode.wide else 4
    for item in t.chunks():
        if type(item) is _LeafRun:
            # A run of large leaves, merged like a 4 KiB table below (prot codes from the low bytes).
            base, shift = item.base, shifts[item.depth]
            codes = item.raw[item.start * esize:item.stop * esize:esize].translate(
                _PROT_CODES[item.pprot & PROT_MASK])
            base += item.start << shift
            for a, b in _equal_runs(codes):
                va, prot = base + (a << shift), codes[a]
                if va != end or prot != cur:
                    if start >= 0:
                        yield line(start, end, cur)
                    start, cur = va, prot
                end = base + (b << shift)
            continue
        if type(item) is not _LeafTable:
            va, _e, depth, prot, _priv = item
            if va != end or prot != cur:
                if start >= 0:
                    yield line(start, end, cur)
                start, cur = va, prot
            end = va + (1 << shifts[depth])
            continue
        # A whole 4 KiB table in C: P/RW/US sit in each entry's low byte, so one slice and one
        # translate give every entry's prot (0 when absent), and _equal_runs finds the equal runs.
        base = item.base
        codes = item.raw[::esize].translate(_PROT_CODES[item.pprot & PROT_MASK])
        n = len(codes)
        # every entry present and each unlike the next (one range per page): the neighbours' XOR, one
        # big-int operation in C, has no zero byte; then the runs need no search at all
        singles = n > 1 and b"\x00" not in codes and b"\x00" not in (
            int.from_bytes(codes[1:], "big") ^ int.from_bytes(codes[:-1], "big")).to_bytes(n - 1, "big")
        if singles:
            runs = [(0, 1), (n - 1, n)]
        else:
            runs = _equal_runs(codes)
            if not runs:
                continue
        # the first run may continue the open range; the last stays open (the next table may continue it)
        first, stop = runs[0]
        va, prot = base + (first << 12), codes[first]
        if va != end or prot != cur:
            if start >= 0:
                yield line(start, end, cur)
            start, cur = va, prot
        end = base + (stop << 12)
        if len(runs) == 1:
            continue
        yield line(start, end, cur)
        middle = runs[1:-1] if not singles else None
        if middle or (singles and n > 2):
            # every middle run is a whole range of its own: a million one-page ranges are a million lines,
            # built from cached digit strings (no hex formatting per line) where no address needs
            # canonicalizing differently (the whole span on one side of the canonical hole: its top digits are
            # the sign-extended base's)
            if not cbit or base >> cbit == (base + (n << 12)) >> cbit:
                cbase = base | sext if base >> cbit & 1 else base
                if singles:  # every line but its prot is the span's template: filled by C loops alone
                    yield _singles_text(cbase, codes)
                else:
                    pre = f"{cbase:016x}"[:10]
                    low = _low_digits(base & 0xFFFFFF, n)
                    sizes = _SIZE_TEXT
                    yield "".join([f"{pre}{low[a]}-{pre}{low[b]} {sizes[b - a]} {ptext[codes[a]]}\n"
                                   for a, b in middle])
            else:
                pairs = middle if middle is not None else [(k, k + 1) for k in range(1, n - 1)]
                yield "".join([line(base + (a << 12), base + (b << 12), codes[a]) for a, b in pairs])
        first, stop = runs[-1]
        start, cur, end = base + (first << 12), codes[first], base + (stop << 12)
    if start >= 0:
        yield line(start, end, cur)


#: The walk's own parts, for other views of the same leaves (the C-bit map, ``sevmon.x86.sev_memory_map``): they
#: read the very tables ``info mem``/``info tlb`` read, so a warm cache makes them cost no round trip.
tables = _tables
LeafTable = _LeafTable
LeafRun = _LeafRun
canonical = _canon
PROT_CODES = _PROT_CODES


def tables_unchanged(mem: PhysicalMemory, requests: list[list[int]], frames: dict[int, bytes | None]) -> bool:
    """Do the tables a past walk read (its ``requests``, level by level, and the ``frames`` it got) still hold
    what they held? Read through ``mem`` as a walk reads them, one ``read_frames`` per level, stopping at the first
    level that differs: with every level before it equal, a fresh walk asks for exactly these frames in exactly
    these requests, so this check costs no read a walk would not make (a walk after a difference finds them in
    the page cache). A walk's text depends on its paging registers and on these bytes alone."""
    for pfns in requests:
        got = mem.read_frames(pfns)
        for f in pfns:
            d = got.get(f)
            if (d if d is not None and len(d) >= _PAGE else None) != frames.get(f):
                return False
    return True


def count_table_reads(mem: PhysicalMemory, cpu: CpuState, me_mask: int = 0) -> tuple[int, int]:
    """``(pages, runs)`` a cold walk asks for: distinct table pages, and their contiguous runs per level call.

    This is the lower bound on round trips for a layer that merges each level's request into contiguous runs
    (benchmarks compare the real counters with it). A frame already read at an upper level is not asked for
    again. ``(0, 0)`` when paging is off. It reads the tables through ``mem`` to find them.
    """
    t = _tables(mem, cpu, me_mask)
    if t is None:
        return 0, 0
    return sum(map(len, t.requests)), sum(_runs(r) for r in t.requests)


def _runs(pfns: Iterable[int]) -> int:
    n = 0
    prev = None
    for f in sorted(pfns):
        if prev is None or f != prev + 1:
            n += 1
        prev = f
    return n


# -- single-address translation (x86_cpu_get_phys_page_attrs_debug) -----------------------------------------
def _read_entry(mem: PhysicalMemory, addr: int, size: int) -> int:
    """One table entry, read as part of its whole frame (absent frames read as zero)."""
    pfn = addr >> 12
    data = mem.read_frames([pfn]).get(pfn)
    if data is None:
        return 0
    return struct.unpack_from("<Q" if size == 8 else "<I", data, addr & 0xFFF)[0]


def translate(mem: PhysicalMemory, cpu: CpuState, va: int, me_mask: int = 0) -> tuple[int, bool] | None:
    """Guest-virtual → ``(guest-physical, private)``, or None when unmapped; what ``gva2gpa``/``x``/``memsave`` use.

    Follows ``x86_cpu_get_phys_page_attrs_debug``, not the monitor walkers: addresses are entry bits 12..51
    (PG_ADDRESS_MASK) after the C-bit is stripped, non-canonical long-mode VAs are unmapped, 32-bit/PAE modes use
    the low 32 bits of ``va``, 4 MiB pages honour PSE-36, A20 is ignored, and with paging off the VA is the GPA
    (bits 0..51, private).
    """
    va &= _U64
    name = cpu.paging_mode()
    if name == "off":
        return va & (PG_ADDRESS_MASK | 0xFFF), True
    if name == "32":
        va &= 0xFFFFFFFF
        pde = _read_entry(mem, (cpu.cr3 & 0xFFFFF000) + ((va >> 20) & 0xFFC), 4)
        if not pde & PG_PRESENT:
            return None
        if pde & PG_PSE and cpu.cr4 & CR4_PSE:
            pte = pde | ((pde & 0x1FE000) << 19)     # PSE-36: entry bits 13..20 are address bits 32..39
            size = 1 << 22
        else:
            pte = _read_entry(mem, (pde & 0xFFFFF000) + ((va >> 10) & 0xFFC), 4)
            if not pte & PG_PRESENT:
                return None
            size = 1 << 12
        return (pte & PG_ADDRESS_MASK & ~(size - 1)) | (va & (size - 1)), True

    me = me_mask
    cr3 = cpu.cr3 & ~me
    mode = mode_of(cpu)
    if name == "pae":
        va &= 0xFFFFFFFF
        table = cr3 & ~0x1F & _U64
    else:
        sva = va - (1 << 64) if va >> 63 else va
        if (sva >> mode.canon_bit) not in (0, -1):
            return None
        table = cr3 & PG_ADDRESS_MASK
    steps = [(lvl.shift, (lvl.entries - 1) << 3, lvl.large_leaf) for lvl in mode.levels]
    for shift, idx_mask, ps_leaf in steps:
        e = _read_entry(mem, table + ((va >> (shift - 3)) & idx_mask), 8)
        if not e & PG_PRESENT:
            return None
        c = e & me
        e ^= c
        if shift == 12 or (ps_leaf and e & PG_PSE):
            size = 1 << shift
            return (e & PG_ADDRESS_MASK & ~(size - 1)) | (va & (size - 1)), c != 0 or not me
        table = e & PG_ADDRESS_MASK
    raise AssertionError("unreachable")


def gva2gpa_text(mem: PhysicalMemory, cpu: CpuState, va: int, me_mask: int = 0) -> str:
    """``gva2gpa``'s reply without the line end: ``gpa: %#x`` (C's ``%#`` prints 0 as ``0``) or ``Unmapped``."""
    r = translate(mem, cpu, va, me_mask)
    if r is None:
        return "Unmapped"
    return f"gpa: {r[0]:#x}" if r[0] else "gpa: 0"
