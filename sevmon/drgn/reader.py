"""drgn's physical-memory reader over sevmon's ``read-guest-physical``, with a page cache on the client side.

Why a client cache: drgn reads a few bytes at a time (a ``task_struct`` field, one page-table entry), thousands
of times; the daemon's page cache already decrypts each page once while the guest is paused, but each read
would still be one QMP request. The client keeps the whole pages it was sent, and asks for a page only once.

When that cache must be dropped, so that it never shows what the guest no longer holds:
- a reply says the guest was ``running`` when it was read: that page is not kept, and nothing kept earlier is
  trusted (the guest runs: every read goes to the daemon, which reads it fresh);
- any event reaches this connection (``RESUME``, ``STOP``, ``RESET``, ``SHUTDOWN``...: the guest ran, was reset
  or is gone; another client's ``cont`` comes here too): the events already sent are read before each cache hit
  (one ``select``), so a hit never outlives an event the daemon had sent;
- :meth:`PhysicalReader.drop` (for a caller that knows more, e.g. after writing guest memory through gdb).
"""

from __future__ import annotations

import base64

from sevmon.drgn.qmp_client import QmpClient, QmpError

PAGE = 4096
MAX_REQUEST = 1 << 20  #: the daemon's bound per read-guest-physical call
MAX_PAGES = 65536      #: 256 MiB of plaintext kept at most (then the cache starts over)


class ReadFault(Exception):
    """A read the daemon refused or could not do (not RAM, debug refused): ``reason`` is its sentence."""

    def __init__(self, address: int, reason: str):
        super().__init__(reason)
        self.address = address
        self.reason = reason


class PhysicalReader:
    """``read(address, count)`` of guest-physical bytes, whole pages asked of the daemon and kept while valid.

    Every page is read private (decrypted with the guest's key): a page the guest shares with the host (C-bit clear
    in its mapping: a bounce buffer, the GHCB) reads as what decryption makes of it, not as its bytes."""

    def __init__(self, client: QmpClient, *, cache: bool = True, cbit_mask: int = 0):
        """``cbit_mask``: the guest's C-bit, stripped from every address asked (drgn takes page-table entries'
        address bits as they are, C-bit included); the page is read private (decrypted with the guest's key)."""
        self.client = client
        self.cbit_mask = cbit_mask
        self.cache_enabled = cache
        self.pages: dict[int, bytes] = {}
        self.requests = 0       #: read-guest-physical calls made
        self.reads = 0          #: reads asked of this reader (drgn's)
        client.on_event = self._on_event

    def _on_event(self, msg: dict) -> None:
        self.pages.clear()

    def drop(self) -> None:
        self.pages.clear()

    def _fetch(self, address: int, size: int) -> tuple[bytes, bool]:
        self.requests += 1
        try:
            r = self.client.execute("read-guest-physical", {"addr": address, "size": size})
        except QmpError as e:
            raise ReadFault(address, e.desc) from None
        return base64.b64decode(r["data"]), r["running"]

    def read(self, address: int, count: int) -> bytes:
        self.reads += 1
        address &= ~self.cbit_mask
        if count <= 0:
            return b""
        if not self.cache_enabled:
            out = bytearray()
            while len(out) < count:
                n = min(count - len(out), MAX_REQUEST)
                out += self._fetch(address + len(out), n)[0]
            return bytes(out)
        if self.pages:
            self.client.poll_events()  # an event already sent drops the cache before it is used
        first, last = address // PAGE, (address + count - 1) // PAGE
        have = {p: self.pages[p] for p in range(first, last + 1) if p in self.pages}
        missing = [p for p in range(first, last + 1) if p not in have]
        got: dict[int, bytes] = {}
        ran = False
        i = 0
        while i < len(missing):  # consecutive missing pages: one request per run (bounded)
            j = i
            while j + 1 < len(missing) and missing[j + 1] == missing[j] + 1 and (j + 2 - i) * PAGE <= MAX_REQUEST:
                j += 1
            data, running = self._fetch(missing[i] * PAGE, (j - i + 1) * PAGE)
            ran = ran or running
            for k in range(j - i + 1):
                got[missing[i] + k] = data[k * PAGE:(k + 1) * PAGE]
            i = j + 1
        if ran:  # the guest runs: nothing read is kept, nothing kept is trusted again
            self.pages.clear()
        else:
            if len(self.pages) + len(got) > MAX_PAGES:
                self.pages.clear()
            self.pages.update(got)
        have.update(got)
        out = b"".join(have[p] for p in range(first, last + 1))
        off = address - first * PAGE
        return out[off:off + count]
