"""Guest-physical RAM, stored sparsely by 4 KiB frame.

The store holds bytes *at rest*: plaintext for a plain guest, ciphertext for an SEV guest
(the SEV layer encrypts before it stores). A 1 TiB guest costs memory in proportion to
the frames that exist; a frame that does not exist is not RAM ("Cannot access memory").
"""

from __future__ import annotations

from collections.abc import Iterator
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
    A frame that does not exist is not RAM."""

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
    only frames that were written or loaded exist.
    """

    def __init__(self, size: int):
        self.size = size
        self._frames: dict[int, bytearray] = {}

    # -- frames ---------------------------------------------------------------------------
    def has(self, pfn: int) -> bool:
        return pfn in self._frames

    def frame(self, pfn: int) -> bytearray | None:
        """The stored bytes of frame ``pfn`` (mutable, at rest), or None if it does not exist."""
        return self._frames.get(pfn)

    def ensure(self, pfn: int) -> bytearray:
        """The frame ``pfn``, created zero-filled if it did not exist."""
        f = self._frames.get(pfn)
        if f is None:
            f = self._frames[pfn] = bytearray(PAGE_SIZE)
        return f

    def set_frame(self, pfn: int, data: bytes) -> None:
        assert len(data) == PAGE_SIZE
        self._frames[pfn] = bytearray(data)

    def drop(self, pfn: int) -> None:
        self._frames.pop(pfn, None)

    def frames(self) -> Iterator[int]:
        """Existing frame numbers, in ascending order."""
        return iter(sorted(self._frames))

    def __len__(self) -> int:
        return len(self._frames)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Maximal runs of existing frames as ``(first pfn, count)``, ascending."""
        start = prev = None
        for pfn in self.frames():
            if start is None:
                start = prev = pfn
            elif pfn == prev + 1:
                prev = pfn
            else:
                yield start, prev - start + 1
                start = prev = pfn
        if start is not None:
            yield start, prev - start + 1

    # -- byte ranges (at rest, no decryption) ---------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        """Bytes at rest in ``[gpa, gpa+size)``; MemoryAccessError at the first missing frame."""
        out = bytearray()
        while size > 0:
            pfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            f = self._frames.get(pfn)
            if f is None:
                raise MemoryAccessError(gpa)
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
