"""``DebugMemory``: the one debug-access API every monitor command reads through.

Reads decrypt whole pages into a bounded LRU of plaintext pages. A caller that needs many
frames (a page-table walker asking for all the tables of one level) gets its misses
grouped into physically contiguous runs, one request (one kernel round trip on SEV) per
run. Coherence: a debug write goes through the ops (DBG_ENCRYPT) and patches the cached
copy; ``invalidate()`` is called by the machine on ``cont``, ``system_reset`` and whenever
the guest has run, so a cached page is never stale across commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sevmon.debug.cache import PageCache
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, GuestRAM, MemoryAccessError

MAX_RUN_PAGES = 16384  # 64 MiB per request bounds the kernel's pinned memory per ioctl


def contiguous_runs(pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted distinct frames grouped as (first, count) runs of consecutive frames."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == pfn and runs[-1][1] < MAX_RUN_PAGES:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


class _NoCache:
    @staticmethod
    def get(pfn: int) -> None:
        return None


_NO_CACHE = _NoCache()


class DebugMemory:
    """Implements ``sevmon.debug.PhysicalMemory`` over RAM debug ops with a page cache.

    ``batch=False`` asks for each missing page separately (the "per-page cache" the
    benchmark compares against); ``cache_pages=0`` disables caching.
    """

    def __init__(self, ram: GuestRAM, ops, *, cache_pages: int = 16384, batch: bool = True):
        self.ram = ram
        self.ops = ops
        self.cache = PageCache(cache_pages)
        self.shared_cache = PageCache(cache_pages)
        self.batch = batch
        # device memory (what is not RAM), read by the VMM when it can (an attached QEMU): device
        # registers are not encrypted and read with side effects, so never cached
        self.device: Callable[[int, int], bytes] | None = None
        # may the page cache be used now? (attached: only once the command synced with QEMU)
        self.coherent: Callable[[], bool] = lambda: True
        # whole walk outputs (info mem / info tlb text) by what they depend on, valid exactly as long as the
        # page cache is (cleared with it, and by any write); None: not kept (an attached machine keeps them:
        # a paused guest's second walk then costs no walk at all, as a QEMU that prints from its own RAM)
        self.memo: dict | None = None
        # the last walk of each kind (info mem, info tlb) where memo is kept: (memo key, the walk's requests, the
        # table bytes it read, its text). Kept across invalidation: it is used only once every one of those tables,
        # read again, holds the same bytes (sevmon.x86.paging.tables_unchanged)
        self.walks: dict[str, tuple] = {}

    # -- reads -----------------------------------------------------------------------------
    def read_frames(self, pfns: Iterable[int], *, private: bool = True, fill: bool = True) -> dict[int, bytes]:
        """Plaintext of the frames that are RAM; ``fill=False`` streams without caching."""
        cache = self.cache if private else self.shared_cache
        if not self.coherent():
            cache, fill = _NO_CACHE, False
        out: dict[int, bytes] = {}
        missing = []
        for pfn in dict.fromkeys(pfns):
            data = cache.get(pfn)
            if data is None:
                if self.ram.has(pfn):
                    missing.append(pfn)
            else:
                out[pfn] = data
        runs = contiguous_runs(missing) if self.batch else [(p, 1) for p in sorted(missing)]
        for first, count in runs:
            blob = self.ops.read_run(first << PAGE_SHIFT, count << PAGE_SHIFT, private)
            for i in range(count):
                page = blob[i << PAGE_SHIFT:(i + 1) << PAGE_SHIFT]
                if fill:
                    cache.put(first + i, page)
                out[first + i] = page
        return out

    def read(self, gpa: int, size: int, *, private: bool = True, fill: bool = True) -> bytes:
        """``size`` bytes at ``gpa``; MemoryAccessError (at the first bad address) otherwise."""
        if size <= 0:
            return b""
        first, last = gpa >> PAGE_SHIFT, (gpa + size - 1) >> PAGE_SHIFT
        pages = self.read_frames(range(first, last + 1), private=private, fill=fill)
        out = bytearray()
        device_at = None  # start of the device bytes still to read (consecutive non-RAM pages: one read)
        for pfn in range(first, last + 1):
            page = pages.get(pfn)
            if page is None:
                if self.device is None:
                    raise MemoryAccessError(max(gpa, pfn << PAGE_SHIFT))
                if device_at is None:
                    device_at = max(gpa, pfn << PAGE_SHIFT)
                continue
            if device_at is not None:
                out += self.device(device_at, (pfn << PAGE_SHIFT) - device_at)
                device_at = None
            lo = max(gpa, pfn << PAGE_SHIFT) - (pfn << PAGE_SHIFT)
            hi = min(gpa + size, (pfn + 1) << PAGE_SHIFT) - (pfn << PAGE_SHIFT)
            out += page[lo:hi]
        if device_at is not None:
            out += self.device(device_at, gpa + size - device_at)
        return bytes(out)

    def read_zero_filled(self, gpa: int, size: int, *, private: bool = True) -> bytes:
        """Like ``read`` but non-RAM reads as zeros (QEMU's unassigned memory), uncached:
        for streaming copies (pmemsave, dumps) that must not evict the walkers' tables.

        A RAM frame the guest never wrote (``ram.stored`` false: a built-in guest's untouched RAM) holds the
        guest's zeros, and DBG_DECRYPT would return exactly those: the copy writes them without the round trip,
        so a dump of a 16 GiB guest costs what the guest wrote, not 16 GiB of firmware calls."""
        first, last = gpa >> PAGE_SHIFT, (gpa + size - 1) >> PAGE_SHIFT
        stored = getattr(self.ram, "stored", None)
        pfns = range(first, last + 1) if stored is None else [p for p in range(first, last + 1) if stored(p)]
        pages = self.read_frames(pfns, private=private, fill=False)
        zero = bytes(PAGE_SIZE)
        out = b"".join(pages.get(p, zero) for p in range(first, last + 1))
        off = gpa & (PAGE_SIZE - 1)
        return out[off:off + size]

    # -- writes ----------------------------------------------------------------------------
    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        """Write ``data`` exactly (the ops' requests are exact, see ``SevVm.dbg_encrypt``), then patch the cache
        with it: only after the write succeeded, so the cache holds only what reached guest memory. A failed
        write (its pages restored by the ops) drops its pages from the cache, so the next read asks the firmware."""
        if self.memo:  # any write, even a failed one, outdates a remembered walk's text
            self.memo.clear()
        cache = self.cache if private else self.shared_cache
        try:
            self.ops.write(gpa, data, private)
        except MemoryAccessError:
            if data:
                for pfn in range(gpa >> PAGE_SHIFT, ((gpa + len(data) - 1) >> PAGE_SHIFT) + 1):
                    cache.drop(pfn)
            raise
        pos = 0
        while pos < len(data):
            a = gpa + pos
            n = min(len(data) - pos, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            cache.patch(a >> PAGE_SHIFT, a & (PAGE_SIZE - 1), data[pos:pos + n])
            pos += n

    # -- coherence and accounting ---------------------------------------------------------
    def invalidate(self) -> None:
        self.cache.clear()
        self.shared_cache.clear()
        if self.memo:
            self.memo.clear()

    def stats(self) -> dict:
        s = dict(self.ops.stats())
        s.update({"cache-hits": self.cache.hits + self.shared_cache.hits,
                  "cache-misses": self.cache.misses + self.shared_cache.misses,
                  "cache-pages": len(self.cache) + len(self.shared_cache)})
        return s
