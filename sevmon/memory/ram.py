"""Guest-physical RAM, stored sparsely by 4 KiB frame.

The store holds bytes *at rest*: plaintext for a plain guest, ciphertext for an SEV guest
(the SEV layer encrypts before it stores). A 1 TiB guest costs memory in proportion to
the frames that exist. A frame that does not exist is not RAM ("Cannot access memory"), except below
``dense_top``: there every frame is RAM, as all of a QEMU guest's ``-m`` is, and one never written holds the
guest's zeros (``blank``). Images (cores, raw files) are sparse: what they lack is not in the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)


class MemoryAccessError(Exception):
    """A guest-physical access touched a frame that is not RAM (or debug access was refused)."""

    def __init__(self, gpa: int, reason: str = "Cannot access memory"):
        super().__init__(reason)
        self.gpa = gpa
        self.reason = reason


@runtime_checkable
class GuestRAM(Protocol):
    """Guest-physical frames at rest, as the debug layer and the SEV path reach them: sevmon's own sparse store
    (:class:`RAM`) or a running QEMU's shared backend mapped into sevmon (:class:`sevmon.attach.ram.MappedRAM`).
    A frame that ``has`` denies is not RAM."""

    size: int

    def has(self, pfn: int) -> bool: ...

    def frame(self, pfn: int) -> bytes | bytearray | None: ...

    def frames(self) -> Iterator[int]: ...

    def runs(self) -> Iterator[tuple[int, int]]: ...

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class RAM:
    """Sparse guest-physical memory: ``{frame number: bytearray(4096)}``.

    ``size`` is the guest's RAM size as configured (what ``info`` commands and dumps report);
    only frames that were written or loaded are stored. ``dense_top``: every frame below it is RAM, stored or
    not (a built-in guest's ``--memory``); a frame there that was never written reads as ``blank(pfn)``, the
    bytes at rest of a page of zeros (for an SEV guest, zeros under its key, so DBG_DECRYPT gives zeros), and
    is not stored until written, so a 16 GiB guest costs what it wrote.
    """

    def __init__(self, size: int, *, dense_top: int = 0):
        self.size = size
        self.dense_pages = min(dense_top, size) >> PAGE_SHIFT
        self.blank: Callable[[int], bytes] | None = None
        #: ``(gpa, size)`` ranges no guest key covers, QEMU's ROMs (the ISA BIOS copy below 1 MiB, pflash units
        #: after the first): their bytes at rest are what the guest and QEMU's ``xp`` see, on an SEV guest too.
        self.rom: list[tuple[int, int]] = []
        self._frames: dict[int, bytearray] = {}

    # -- frames ---------------------------------------------------------------------------
    def has(self, pfn: int) -> bool:
        """Frame ``pfn`` is RAM: stored, or below ``dense_top``."""
        return pfn in self._frames or 0 <= pfn < self.dense_pages

    def stored(self, pfn: int) -> bool:
        """Frame ``pfn`` was written or loaded (a dump or an image holds it)."""
        return pfn in self._frames

    def _blank(self, pfn: int) -> bytearray:
        return bytearray(self.blank(pfn)) if self.blank is not None else bytearray(PAGE_SIZE)

    def frame(self, pfn: int) -> bytearray | None:
        """The bytes of frame ``pfn`` at rest (mutable when stored), or None if it is not RAM. A never-written
        dense frame is its ``blank`` bytes, a fresh copy: write through ``write``/``ensure`` to keep a change."""
        f = self._frames.get(pfn)
        if f is None and 0 <= pfn < self.dense_pages:
            return self._blank(pfn)
        return f

    def ensure(self, pfn: int) -> bytearray:
        """The stored frame ``pfn``, created if it did not exist (its blank bytes below ``dense_top``, else zeros)."""
        f = self._frames.get(pfn)
        if f is None:
            f = self._frames[pfn] = self._blank(pfn) if pfn < self.dense_pages else bytearray(PAGE_SIZE)
        return f

    def set_frame(self, pfn: int, data: bytes) -> None:
        assert len(data) == PAGE_SIZE
        self._frames[pfn] = bytearray(data)

    def drop(self, pfn: int) -> None:
        self._frames.pop(pfn, None)

    def frames(self) -> Iterator[int]:
        """Stored frame numbers (written or loaded), in ascending order."""
        return iter(sorted(self._frames))

    def __len__(self) -> int:
        return len(self._frames)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Maximal runs of RAM frames (stored, or below ``dense_top``) as ``(first pfn, count)``, ascending."""
        start = prev = None
        dense = self.dense_pages
        above = (p for p in sorted(self._frames) if p >= dense)
        if dense:
            start, prev = 0, dense - 1
        for pfn in above:
            if start is None:
                start = prev = pfn
            elif pfn == prev + 1:
                prev = pfn
            else:
                yield start, prev - start + 1
                start = prev = pfn
        if start is not None:
            yield start, prev - start + 1

    def rom_in(self, gpa: int, size: int) -> list[tuple[int, int]]:
        """The parts of ``[gpa, gpa+size)`` that are ROM, as ``(gpa, size)``."""
        out = []
        for base, n in self.rom:
            lo, hi = max(gpa, base), min(gpa + size, base + n)
            if lo < hi:
                out.append((lo, hi - lo))
        return out

    # -- byte ranges (at rest, no decryption) ---------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        """Bytes at rest in ``[gpa, gpa+size)``; MemoryAccessError at the first missing frame."""
        out = bytearray()
        while size > 0:
            pfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            f = self._frames.get(pfn)
            if f is None:
                if not 0 <= pfn < self.dense_pages:
                    raise MemoryAccessError(gpa)
                f = self._blank(pfn)
            out += f[off:off + n]
            gpa += n
            size -= n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at rest at ``gpa``, creating frames as needed."""
        mv = memoryview(data)
        while len(mv):
            pfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(len(mv), PAGE_SIZE - off)
            self.ensure(pfn)[off:off + n] = mv[:n]
            gpa += n
            mv = mv[n:]
