"""Host physical memory as the PSP sees it, and the extent allocator the simulated kernel
uses for its address spaces (kernel pages, the VMM's heap, guest RAM slots).

Part of the simulated platform: the firmware reads and writes *system physical*
addresses here, never the VMM's virtual ones.
"""

from __future__ import annotations

import bisect

from sevmon.memory.ram import RAM
from sevmon.sev.abi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE


class Extents:
    """Non-overlapping ``[base, base+size)`` ranges with a payload, and first-fit allocation."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self._bases: list[int] = []
        self._items: dict[int, tuple[int, object]] = {}

    def add(self, base: int, size: int, payload: object) -> None:
        self._items[base] = (size, payload)  # item before index: lock-free readers stay consistent
        bisect.insort(self._bases, base)

    def remove(self, base: int) -> object:
        self._bases.remove(base)
        return self._items.pop(base)[1]

    def alloc(self, size: int, payload: object) -> int:
        """Place ``size`` bytes (page-granular, with a guard page) at the first free address."""
        size = (size + PAGE_SIZE - 1) & PAGE_MASK or PAGE_SIZE
        at = self.lo
        for b in self._bases:
            if b - at >= size + PAGE_SIZE:
                break
            at = max(at, b + self._items[b][0] + PAGE_SIZE)
        if at + size > self.hi:
            raise MemoryError("simulated address space exhausted")
        self.add(at, size, payload)
        return at

    def find(self, addr: int) -> tuple[int, int, object] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base = self._bases[i]
            size, payload = self._items[base]
            if addr < base + size:
                return base, size, payload
        return None

    def next_base(self, addr: int) -> int:
        i = bisect.bisect_right(self._bases, addr)
        return self._bases[i] if i < len(self._bases) else 1 << 64


class HostMemory:
    """Host physical memory (DRAM) by system physical address, as the PSP sees it.

    Regions are bytearrays (kernel pages, VMM heap buffers) or a guest's sparse RAM store
    mapped at its host physical base. Anything else reads as zeros and keeps what is written.
    """

    def __init__(self):
        self._regions = Extents(0, 1 << 52)
        self._loose: dict[int, bytearray] = {}

    def map(self, base: int, backing: bytearray | RAM, size: int | None = None) -> None:
        size = len(backing) if size is None else size
        self._regions.add(base, size, backing)

    def unmap(self, base: int) -> None:
        self._regions.remove(base)

    def read(self, spa: int, n: int) -> bytes:
        parts = []
        while n > 0:
            hit = self._regions.find(spa)
            if hit is None:
                take = min(n, self._regions.next_base(spa) - spa)
                parts.append(self._loose_read(spa, take))
            else:
                base, size, backing = hit
                take = min(n, base + size - spa)
                off = spa - base
                if isinstance(backing, RAM):
                    parts.append(_ram_read(backing, off, take))
                else:
                    parts.append(bytes(backing[off:off + take]))
            spa += take
            n -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, spa: int, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            hit = self._regions.find(spa)
            if hit is None:
                take = min(len(mv), self._regions.next_base(spa) - spa)
                self._loose_write(spa, mv[:take])
            else:
                base, size, backing = hit
                take = min(len(mv), base + size - spa)
                off = spa - base
                if isinstance(backing, RAM):
                    backing.write(off, mv[:take])
                else:
                    backing[off:off + take] = mv[:take]
            spa += take
            mv = mv[take:]

    def _loose_read(self, spa: int, n: int) -> bytes:
        out = bytearray(n)
        pos = 0
        while pos < n:
            pfn, off = (spa + pos) >> PAGE_SHIFT, (spa + pos) & (PAGE_SIZE - 1)
            take = min(n - pos, PAGE_SIZE - off)
            page = self._loose.get(pfn)
            if page is not None:
                out[pos:pos + take] = page[off:off + take]
            pos += take
        return bytes(out)

    def _loose_write(self, spa: int, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            pfn, off = (spa + pos) >> PAGE_SHIFT, (spa + pos) & (PAGE_SIZE - 1)
            take = min(len(mv) - pos, PAGE_SIZE - off)
            self._loose.setdefault(pfn, bytearray(PAGE_SIZE))[off:off + take] = mv[pos:pos + take]
            pos += take


def _ram_read(ram: RAM, off: int, n: int) -> bytes:
    """Bytes at rest in a RAM store; frames that do not exist read as zeros (plain DRAM)."""
    parts = []
    zero = bytes(PAGE_SIZE)
    while n > 0:
        pfn, o = off >> PAGE_SHIFT, off & (PAGE_SIZE - 1)
        take = min(n, PAGE_SIZE - o)
        f = ram.frame(pfn)
        if f is None:
            f = zero
        parts.append(f if take == PAGE_SIZE else f[o:o + take])
        off += take
        n -= take
    return b"".join(parts)

