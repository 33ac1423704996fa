"""Guest memory access with the *debug* attribute (the seed series' ``MemTxAttrs.debug``).

Every monitor command that touches guest memory comes through here. The walkers in
``sevmon.x86`` and the HMP/QMP memory commands depend only on the small protocol below;
they never know whether the RAM under it is encrypted or cached.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from sevmon.memory.ram import MemoryAccessError  # noqa: F401  (re-exported)


class PhysicalMemory(Protocol):
    """Debug access to guest-physical memory.

    ``read_frames`` is the walker's interface: it asks for *all* the tables of one level
    at once so the layer below can group them into contiguous runs (one kernel round trip
    per run on SEV). Frames that are not RAM are simply absent from the result; a walker
    treats them as all-zero tables (QEMU reads unassigned memory as 0).

    ``read`` is the byte interface (``x``, ``xp``, ``memsave``...). ``private`` says
    whether the access is to a private (C-bit set: decrypt with the guest key) or shared
    page; table reads are always private. It raises ``MemoryAccessError`` for non-RAM or
    when debug access is refused.
    """

    def read_frames(self, pfns: Iterable[int]) -> dict[int, bytes]: ...

    def read(self, gpa: int, size: int, *, private: bool = True) -> bytes: ...

    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None: ...


@runtime_checkable
class MachineMemory(PhysicalMemory, Protocol):
    """The debug memory a machine exposes (``Machine.memory``; :class:`sevmon.debug.access.DebugMemory`): the
    physical interface above, plus what the monitor asks of the layer itself. ``ops`` are the RAM debug ops under
    it (plain or SEV): their ``refusal`` is the debug-refusal rule's answer for this guest, their ``stats()`` the
    kernel's counters. ``invalidate`` drops cached plaintext (the guest ran); ``read_zero_filled`` reads a range
    with non-RAM as zeros (dumps)."""

    ops: Any

    def read_zero_filled(self, gpa: int, size: int, *, private: bool = True) -> bytes: ...

    def invalidate(self) -> None: ...

    def stats(self) -> dict: ...
