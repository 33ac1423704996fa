"""The readers the benchmark compares, side by side on the same guest.

- ``sevmon``: ``DebugMemory`` as built (page cache, level-wide batches, contiguous runs).
- ``per-page``: the same cache, but one request per missing page (no batching).
- ``naive``: the seed series' reader: one DBG_DECRYPT per 8-byte (4-byte) entry, no cache.
"""

from __future__ import annotations

from collections.abc import Iterable

from sevmon.debug.access import DebugMemory
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE


class NaiveMemory:
    """One kernel round trip per table entry, like ``ldq_phys_debug`` per entry did."""

    def __init__(self, ops, entry_size: int = 8):
        self.ops = ops
        self.entry_size = entry_size

    def read_frames(self, pfns: Iterable[int], *, private: bool = True, fill: bool = True) -> dict[int, bytes]:
        out = {}
        for pfn in dict.fromkeys(pfns):
            if not self.ops.ram.has(pfn):
                continue
            base = pfn << PAGE_SHIFT
            out[pfn] = b"".join(self.ops.read_run(base + off, self.entry_size, private)
                                for off in range(0, PAGE_SIZE, self.entry_size))
        return out

    def read(self, gpa: int, size: int, *, private: bool = True, fill: bool = True) -> bytes:
        return self.ops.read_run(gpa, size, private)

    def read_zero_filled(self, gpa: int, size: int, *, private: bool = True) -> bytes:
        return self.ops.read_run(gpa, size, private)

    def invalidate(self) -> None:
        pass


def make_reader(kind: str, ram, ops, cache_pages: int = 16384, entry_size: int = 8):
    if kind == "sevmon":
        return DebugMemory(ram, ops, cache_pages=cache_pages)
    if kind == "per-page":
        return DebugMemory(ram, ops, cache_pages=cache_pages, batch=False)
    if kind == "naive":
        return NaiveMemory(ops, entry_size)
    raise ValueError(kind)
