"""A bounded LRU of plaintext guest pages, by frame number.

It knows nothing of page tables or encryption: it holds what the debug layer decrypted
so that a second look at a page costs no round trip. It never holds a partial page.
"""

from __future__ import annotations

from collections import OrderedDict


class PageCache:
    def __init__(self, max_pages: int):
        self.max_pages = max(0, max_pages)
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, pfn: int) -> bytes | None:
        data = self._pages.get(pfn)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._pages.move_to_end(pfn)
        return data

    def put(self, pfn: int, data: bytes) -> None:
        if self.max_pages == 0:
            return
        self._pages[pfn] = data
        self._pages.move_to_end(pfn)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    def patch(self, pfn: int, offset: int, data: bytes) -> None:
        """Keep a cached page coherent with a debug write (no-op if not cached)."""
        page = self._pages.get(pfn)
        if page is not None:
            self._pages[pfn] = page[:offset] + data + page[offset + len(data):]

    def drop(self, pfn: int) -> None:
        """Forget one page (a write whose outcome is not known for certain)."""
        self._pages.pop(pfn, None)

    def clear(self) -> None:
        self._pages.clear()
