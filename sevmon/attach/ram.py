"""The guest's RAM, mapped from QEMU's shared backend into sevmon.

QEMU's RAM is reachable from another process only when its backend is shared:
``memory-backend-memfd,share=on`` (found as ``/proc/PID/fd/N -> /memfd:... (deleted)``
in QEMU's process, PID from the monitor socket's SO_PEERCRED, taken with
pidfd_open + pidfd_getfd, or by opening the /proc link) or ``memory-backend-file`` with
``share=on`` (its ``mem-path``). The mapping is MAP_SHARED: what sevmon reads is what
the guest sees at that moment, with no copy in between.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterator

from sevmon.attach.errors import AttachError
from sevmon.attach.layout import RamRange
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, MemoryAccessError
from sevmon.pidfd import pidfd_getfd

SHARE_HINT = ("start QEMU with its RAM in a shared backend: -object memory-backend-memfd,id=ram0,size=SIZE,"
              "share=on -machine memory-backend=ram0 (or memory-backend-file,mem-path=/dev/shm/NAME,share=on)")


class MappedRAM:
    """Guest-physical RAM as ranges of mapped backends; the same interface as
    :class:`sevmon.memory.ram.RAM` where the debug layer and the commands use it."""

    def __init__(self, ranges: list[RamRange], maps: dict[str, mmap.mmap], size: int):
        self.ranges = ranges
        self._maps = maps
        self._starts = [r.gpa for r in ranges]
        self.size = size

    def _find(self, gpa: int) -> RamRange | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.ranges[i]
            if gpa < r.gpa + r.size:
                return r
        return None

    def has(self, pfn: int) -> bool:
        return self._find(pfn << PAGE_SHIFT) is not None

    def runs(self) -> Iterator[tuple[int, int]]:
        for r in self.ranges:
            yield r.gpa >> PAGE_SHIFT, r.size >> PAGE_SHIFT

    def frames(self) -> Iterator[int]:
        for first, n in self.runs():
            yield from range(first, first + n)

    def __len__(self) -> int:
        return sum(r.size for r in self.ranges) >> PAGE_SHIFT

    def frame(self, pfn: int) -> bytes | None:
        try:
            return self.read(pfn << PAGE_SHIFT, PAGE_SIZE)
        except MemoryAccessError:
            return None

    def read(self, gpa: int, size: int) -> bytes:
        out = []
        while size > 0:
            r = self._find(gpa)
            if r is None:
                raise MemoryAccessError(gpa)
            n = min(size, r.gpa + r.size - gpa)
            off = r.offset + gpa - r.gpa
            out.append(self._maps[r.memdev][off:off + n])
            gpa += n
            size -= n
        return out[0] if len(out) == 1 else b"".join(out)

    def write(self, gpa: int, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            r = self._find(gpa)
            if r is None:
                raise MemoryAccessError(gpa)
            n = min(len(mv), r.gpa + r.size - gpa)
            off = r.offset + gpa - r.gpa
            self._maps[r.memdev][off:off + n] = mv[:n]
            gpa += n
            mv = mv[n:]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()


def _memfd_candidates(pid: int) -> list[int]:
    out = []
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:"):
            out.append(int(name))
    return sorted(out)


def mapped_inode(pid: int, hva: int) -> int | None:
    """The inode of the file QEMU maps at ``hva`` (``/proc/PID/maps``), or None."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, _, end = fields[0].partition("-")
            if int(start, 16) <= hva < int(end, 16):
                return int(fields[4]) or None
    return None


def open_memfd(pid: int, size: int, taken: set[int], inode: int | None = None) -> int:
    """An fd of ours for QEMU's memfd of ``size`` bytes (matched by fstat, once each): the one
    whose inode is ``inode`` (the file QEMU maps where this backend's RAM is), so that two
    backends of equal size (NUMA nodes) are never swapped."""
    for fd in _memfd_candidates(pid):
        if fd in taken:
            continue
        try:
            ours = pidfd_getfd(pid, fd)
        except PermissionError:
            raise
        except OSError:
            ours = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(ours)
        if st.st_size == size and (inode is None or st.st_ino == inode):
            taken.add(fd)
            return ours
        os.close(ours)
    raise AttachError(f"QEMU (process {pid}) holds no memfd of {size} bytes for its RAM backend")


def map_backend(fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def open_backends(memdevs: list[dict], types: dict[str, str], paths: dict[str, str], pid: int | None,
                  ranges: list[RamRange], hvas: dict[str, int] | None = None) -> MappedRAM:
    """Map every backend the flat view uses. ``memdevs``: query-memdev; ``types``/``paths``:
    qom type and mem-path by id; ``hvas``: where QEMU maps a byte of each memfd backend (its
    ``gpa2hva``), which names the backend's file. Raises AttachError with one sentence."""
    used = {r.memdev for r in ranges}
    if not used:
        raise AttachError(f"QEMU's RAM is not in a memory backend sevmon can map: {SHARE_HINT}")
    by_id = {m["id"]: m for m in memdevs}
    for r in ranges:  # a mapping shorter than the flat view says would read short, silently
        if r.offset + r.size > by_id[r.memdev]["size"]:
            raise AttachError(f"QEMU's flat view puts {r.size:#x} bytes of backend '{r.memdev}' at offset "
                              f"{r.offset:#x}, beyond its size {by_id[r.memdev]['size']:#x}")
    maps: dict[str, mmap.mmap] = {}
    taken: set[int] = set()
    try:
        for mid in sorted(used):
            dev = by_id[mid]
            if not dev.get("share"):
                raise AttachError(f"QEMU's RAM backend '{mid}' is not shared (share=off): {SHARE_HINT}")
            kind = types.get(mid, "")
            try:
                if kind == "memory-backend-memfd":
                    if pid is None:
                        raise AttachError("cannot tell QEMU's process from its monitor socket (no SO_PEERCRED)")
                    hva = (hvas or {}).get(mid)
                    fd = open_memfd(pid, dev["size"], taken, None if hva is None else mapped_inode(pid, hva))
                elif kind == "memory-backend-file":
                    fd = os.open(paths[mid], os.O_RDWR | os.O_CLOEXEC)
                else:
                    raise AttachError(f"QEMU's RAM backend '{mid}' is a {kind or 'backend'} sevmon cannot map: "
                                      f"{SHARE_HINT}")
                maps[mid] = map_backend(fd, dev["size"])
            except PermissionError:
                who = f"process {pid}" if kind == "memory-backend-memfd" else paths.get(mid, mid)
                raise AttachError(f"no permission to QEMU's memory ({who}): run sevmon as QEMU's user "
                                  "(with ptrace access to it) or as root") from None
            except (FileNotFoundError, ProcessLookupError):
                raise AttachError(f"QEMU's process {pid} or its RAM fd vanished while sevmon was attaching"
                                  if kind == "memory-backend-memfd"
                                  else f"QEMU's RAM file {paths.get(mid)} vanished while sevmon was attaching"
                                  ) from None
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return MappedRAM(ranges, maps, sum(by_id[m]["size"] for m in used))


def device_reader(link):
    """``read(gpa, n)`` of device memory (what QEMU's flat view maps as MMIO, not RAM) by QEMU itself, as its
    ``xp`` reads it: devices are not encrypted, and their registers are QEMU's to read (with QEMU's side
    effects). Raises MemoryAccessError where QEMU cannot access memory. RAM never goes this way."""
    def read(gpa: int, n: int) -> bytes:
        text = link.call_sync(link.hmp(f"xp /{n}xb 0x{gpa:x}"))
        out = bytearray()
        for line in text.split("\n"):
            if not line:
                continue
            addr, _, rest = line.partition(":")
            if "Cannot access memory" in rest:
                raise MemoryAccessError(int(addr, 16))
            out += bytes(int(v, 16) for v in rest.split())
        if len(out) != n:
            raise MemoryAccessError(gpa + len(out))
        return bytes(out)
    return read
