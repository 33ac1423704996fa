"""The C-bit map: which of a guest's pages are private (C-bit set: encrypted) and which shared (C-bit clear).

Built on the very walk ``info mem`` and ``info tlb`` do (``sevmon.x86.paging``): the same level-batched table
reads, so after a warm ``info tlb`` (paused guest) the map costs no round trip at all. From each vCPU's leaves:

* **virtual ranges** of one vCPU, merged exactly as ``info mem`` merges them (raw VA order, equal U/W/P, adjacent)
  and split further where the C-bit changes;
* **guest-physical frames** per attribute, over every vCPU (a frame is the VM's, whichever vCPU maps it);
* **aliases**: frames mapped both private and shared, by one vCPU's tables or by two. The two views see different
  bytes (ciphertext through the shared mapping), so writes through one corrupt the other: a classic SEV guest bug.

Without a C-bit (``me_mask == 0``, or 32-bit paging's 4-byte entries) every page is private, as the walker says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sevmon.debug import PhysicalMemory
from sevmon.x86 import paging
from sevmon.x86.cpu import CR4_PSE, CpuState
from sevmon.x86.pte import PG_ADDRESS_MASK, PG_PRESENT, PG_PSE, PG_RW, PG_USER

__all__ = ["VirtualRange", "Alias", "FrameCounts", "SevMemoryMap", "build_map", "frames_text", "PAGE"]

PAGE = 4096
_PRIVATE = 8    # added to a U|W|P prot code when the leaf had the C-bit
# a present entry's code is prot (1..7) | _PRIVATE; absent entries are 0 or _PRIVATE alone
_RUNS = re.compile(rb"([\x01-\x07\x09-\x0f])\1*")
_ALL_PRIVATE = bytes(b | _PRIVATE if b else 0 for b in range(256))


@dataclass(frozen=True, slots=True)
class VirtualRange:
    """One ``info mem`` range with its attribute; start, end and size canonical as ``info mem`` prints them."""

    start: int
    end: int
    size: int
    prot: int       #: U|W|P
    private: bool   #: C-bit set in every leaf of the range

    @property
    def prot_text(self) -> str:
        return f"{'u' if self.prot & PG_USER else '-'}r{'w' if self.prot & PG_RW else '-'}"

    def line(self) -> str:
        """``info mem``'s line plus the attribute column."""
        return (f"{self.start:016x}-{self.end:016x} {self.size:016x} {self.prot_text} "
                f"{'private' if self.private else 'shared'}")


@dataclass(frozen=True, slots=True)
class Alias:
    """A run of guest-physical frames mapped both private and shared; ``(cpu index, gva of gpa)`` per view."""

    gpa: int
    size: int
    private: tuple[tuple[int, int], ...]
    shared: tuple[tuple[int, int], ...]


@dataclass
class SevMemoryMap:
    cpu_index: int
    paging: bool                                  #: False: the vCPU has paging off (``PG disabled``)
    ranges: list[VirtualRange] = field(default_factory=list)
    private: list[tuple[int, int]] = field(default_factory=list)   #: (gpa, size) mapped with the C-bit
    shared: list[tuple[int, int]] = field(default_factory=list)    #: (gpa, size) mapped without it
    aliased: list[tuple[int, int]] = field(default_factory=list)   #: in both lists
    mapped_frames: int = 0                        #: distinct 4 KiB frames mapped, every vCPU
    aliases: list[Alias] = field(default_factory=list)

    def bytes_of(self, private: bool) -> int:
        """Total size of the vCPU's virtual ranges with that attribute."""
        return sum(r.size for r in self.ranges if r.private == private)

    @staticmethod
    def frames(ranges: Iterable[tuple[int, int]]) -> int:
        return sum(size for _gpa, size in ranges) // PAGE

    def frame_counts(self, ram: Sequence[tuple[int, int]], top: int) -> FrameCounts:
        """The mapped frames split as the picture draws them (see :class:`FrameCounts`); ``ram`` is the guest's
        RAM (or the image's frames) as sorted ``(gpa, size)`` runs, ``top`` where the picture ends."""
        inside = _clip(ram, top)
        aliased = _overlap(self.aliased, inside)
        private = _overlap(self.private, inside) - aliased
        shared = _overlap(self.shared, inside) - aliased
        beyond = [(top, (1 << 64) - top)]
        past = _overlap(self.private, beyond) + _overlap(self.shared, beyond) - _overlap(self.aliased, beyond)
        hole = self.mapped_frames * PAGE - private - shared - aliased - past
        return FrameCounts(private // PAGE, shared // PAGE, aliased // PAGE, hole // PAGE, past // PAGE)


@dataclass(frozen=True, slots=True)
class FrameCounts:
    """Every mapped frame in exactly one class, the classes the picture colours (aliased > shared > private):
    ``private``/``shared``/``aliased`` frames of RAM; ``hole``: below the end of RAM but not RAM (a device, or a
    frame a sparse image lacks); ``past``: past the end of RAM (not drawn). They add up to ``mapped_frames``."""

    private: int
    shared: int
    aliased: int
    hole: int
    past: int


def frames_text(m: SevMemoryMap, counts: FrameCounts, hole: str) -> str:
    """``frames mapped: N (P private, S shared, A aliased[; H not RAM][; X past the end of RAM])``: the classes
    add up to N and are the picture's (its legend gives the same numbers)."""
    extra = [f"{n} {what}" for n, what in ((counts.hole, hole), (counts.past, "past the end of RAM")) if n]
    return (f"frames mapped: {m.mapped_frames} ({counts.private} private, {counts.shared} shared, "
            f"{counts.aliased} aliased{''.join('; ' + e for e in extra)})")


def _clip(ranges: Sequence[tuple[int, int]], top: int) -> list[tuple[int, int]]:
    return [(g, min(s, top - g)) for g, s in ranges if g < top]


def _overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> int:
    """Bytes in both of two sorted lists of disjoint ``(start, size)`` ranges."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        a_end, b_end = a[i][0] + a[i][1], b[j][0] + b[j][1]
        hi = min(a_end, b_end)
        if lo < hi:
            total += hi - lo
        if a_end <= b_end:
            i += 1
        else:
            j += 1
    return total


# -- one vCPU's walk -----------------------------------------------------------------------------------------
def _walk_cpu(mem: PhysicalMemory, cpu: CpuState, me_mask: int, want_ranges: bool,
              cpu_index: int) -> tuple[list[VirtualRange] | None, list[tuple[int, int, bool, int, int]]]:
    """One walk: the vCPU's merged virtual ranges (None when paging is off) and its physical extents."""
    t = paging.tables(mem, cpu, me_mask)
    if t is None:
        return None, []
    mode = t.mode
    canon = paging.canonical
    shifts = [lvl.shift for lvl in mode.levels]
    wide = mode.wide
    esize = 8 if wide else 4
    me = t.me
    pse36 = not wide and cpu.cr4 & CR4_PSE
    cbyte, cmask = divmod(me.bit_length() - 1, 8) if me else (0, 0)
    cbit_codes = bytes(_PRIVATE if b >> cmask & 1 else 0 for b in range(256)) if me else b""
    addr_mask = PG_ADDRESS_MASK if wide else 0xFFFFF000

    ranges: list[VirtualRange] = []
    extents: list[tuple[int, int, bool, int, int]] = []
    start = -1
    end = 0
    cur = 0

    def flush() -> None:
        ranges.append(VirtualRange(canon(mode, start), canon(mode, end), canon(mode, end - start),
                                   cur & 7, bool(cur & _PRIVATE)))

    # physical extents: [gpa, gpa_end, private, va] of the run being grown; never across the canonical hole
    hole = 1 << mode.canon_bit if mode.canon_bit else -1
    x_gpa = x_end = x_va = -1
    x_priv = False

    def add(va: int, gpa: int, size: int, private: bool) -> None:
        nonlocal x_gpa, x_end, x_va, x_priv
        if gpa == x_end and private == x_priv and va == x_va + (x_end - x_gpa) and va != hole:
            x_end += size
            return
        if x_gpa >= 0:
            extents.append((x_gpa, x_end, x_priv, cpu_index, canon(mode, x_va)))
        x_gpa, x_end, x_va, x_priv = gpa, gpa + size, va, private

    def large_leaves():
        """The walk's chunks with runs of large leaves taken one leaf at a time (4 KiB tables stay whole)."""
        for item in t.chunks():
            if type(item) is paging.LeafRun:
                entries = t.unpack(item.raw)
                step = shifts[item.depth]
                for i in range(item.start, item.stop):
                    e = entries[i]
                    c = e & me
                    e ^= c
                    yield item.base + (i << step), e, item.depth, e & item.pprot, c != 0 or not me
            else:
                yield item

    for item in large_leaves():
        if type(item) is not paging.LeafTable:
            va, e, depth, prot, private = item
            size = 1 << shifts[depth]
            if pse36 and e & PG_PSE:
                e |= (e & 0x1FE000) << 19          # PSE-36: entry bits 13..20 are address bits 32..39
                gpa = e & PG_ADDRESS_MASK & ~(size - 1)
            else:
                gpa = e & addr_mask & ~(size - 1)
            add(va, gpa, size, private)
            if want_ranges:
                code = prot | (_PRIVATE if private else 0)
                if va != end or code != cur:
                    if start >= 0:
                        flush()
                    start, cur = va, code
                end = va + size
            continue
        base, raw = item.base, item.raw
        entries = t.unpack(raw)
        nme = ~me
        for i, e in enumerate(entries):
            if e & PG_PRESENT:
                add(base + (i << 12), e & nme & addr_mask, PAGE, not me or bool(e & me))
        if not want_ranges:
            continue
        # info mem's table-at-once merge (see paging.info_mem), with the C-bit folded into each entry's code
        codes = raw[::esize].translate(paging.PROT_CODES[item.pprot & 7])
        if me:
            cb = raw[cbyte::8].translate(cbit_codes)
            codes = (int.from_bytes(codes, "little") | int.from_bytes(cb, "little")).to_bytes(len(codes), "little")
        else:
            codes = codes.translate(_ALL_PRIVATE)
        for run in _RUNS.finditer(codes):
            va, code = base + (run.start() << 12), codes[run.start()]
            if va != end or code != cur:
                if start >= 0:
                    flush()
                start, cur = va, code
            end = base + (run.end() << 12)
    if want_ranges and start >= 0:
        flush()
    if x_gpa >= 0:
        extents.append((x_gpa, x_end, x_priv, cpu_index, canon(mode, x_va)))
    return ranges, extents


# -- the physical view over every vCPU ---------------------------------------------------------------------
def _append(out: list[tuple[int, int]], gpa: int, end: int) -> None:
    if out and out[-1][0] + out[-1][1] == gpa:
        out[-1] = (out[-1][0], end - out[-1][0])
    else:
        out.append((gpa, end - gpa))


def _sweep(extents: Sequence[tuple[int, int, bool, int, int]], m: SevMemoryMap) -> None:
    """One pass over every extent boundary: frames per attribute, their union, and the aliases."""
    events: list[tuple[int, int, int]] = []       # (position, +1 start / -1 end, extent index)
    for i, (gpa, end, *_rest) in enumerate(extents):
        events.append((gpa, 1, i))
        events.append((end, -1, i))
    events.sort(key=lambda ev: (ev[0], ev[1]))    # ends before starts at one position
    active: dict[int, tuple[int, int, bool, int, int]] = {}
    n_priv = n_shared = 0
    mapped = 0
    k = 0
    while k < len(events):
        pos = events[k][0]
        while k < len(events) and events[k][0] == pos:
            _pos, kind, i = events[k]
            x = extents[i]
            if kind > 0:
                active[i] = x
            else:
                del active[i]
            if x[2]:
                n_priv += kind
            else:
                n_shared += kind
            k += 1
        if k == len(events):
            break
        nxt = events[k][0]
        if nxt == pos:
            continue
        if n_priv or n_shared:
            mapped += nxt - pos
        if n_priv:
            _append(m.private, pos, nxt)
        if n_shared:
            _append(m.shared, pos, nxt)
        if n_priv and n_shared:
            _append(m.aliased, pos, nxt)
            views = sorted(active.values(), key=lambda x: (x[3], x[4]))
            priv = tuple((x[3], x[4] + pos - x[0]) for x in views if x[2])
            shar = tuple((x[3], x[4] + pos - x[0]) for x in views if not x[2])
            last = m.aliases[-1] if m.aliases else None
            if (last is not None and last.gpa + last.size == pos
                    and _advanced(last.private, last.size) == priv and _advanced(last.shared, last.size) == shar):
                m.aliases[-1] = Alias(last.gpa, last.size + nxt - pos, last.private, last.shared)
            else:
                m.aliases.append(Alias(pos, nxt - pos, priv, shar))
    m.mapped_frames = mapped // PAGE


def _advanced(views: tuple[tuple[int, int], ...], n: int) -> tuple[tuple[int, int], ...]:
    return tuple((c, (va + n) & ((1 << 64) - 1)) for c, va in views)


def _same_tables(a: CpuState, b: CpuState) -> bool:
    """Two vCPUs whose walks are identical (same CR3 and paging controls): walk once."""
    return all(a.get(r) == b.get(r) for r in ("cr0", "cr3", "cr4", "efer"))


def build_map(mem: PhysicalMemory, cpus: Sequence[CpuState], cpu_index: int, me_mask: int) -> SevMemoryMap:
    """The C-bit map: ``cpus[cpu_index]``'s virtual ranges, and frames and aliases over every vCPU.

    A vCPU whose tables equal an earlier one's (same CR3 and paging controls) is not walked again: its mappings
    are the same, listed under the lowest index (the selected vCPU is walked for its ranges either way, from
    the same cached tables). Debug refusals (NODBG) propagate as the walker raises them.
    """
    m = SevMemoryMap(cpu_index, True)
    extents: list[tuple[int, int, bool, int, int]] = []
    walked: list[int] = []
    for i, cpu in enumerate(cpus):
        twin = next((j for j in walked if _same_tables(cpus[j], cpu)), None)
        if twin is not None and i != cpu_index:
            continue
        ranges, ext = _walk_cpu(mem, cpu, me_mask, i == cpu_index, i)
        if i == cpu_index:
            m.paging = ranges is not None
            m.ranges = ranges or []
        if twin is None:
            walked.append(i)
            extents += ext
    _sweep(extents, m)
    return m
