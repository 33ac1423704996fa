"""Guest-virtual ranges to guest-physical runs: the one translation layer under ``x``, ``memsave`` and the gdb
stub's reads and writes.

Every page of a range is translated as ``gva2gpa`` translates it (:func:`sevmon.x86.paging.translate`, QEMU's
``x86_cpu_get_phys_page_attrs_debug``) before a byte is read or written, so an access that would fault half-way
touches nothing and names the first unmapped page. Pages whose frames follow one another and whose leaves agree on
the C-bit merge into one run: a range that is virtually and physically contiguous is one read of guest memory (one
DBG round trip on a cold cache, not one per 4 KiB page). The walk starts at the vCPU's CR3 unless ``root`` names
another table (a walk that starts from a kernel's own page tables rather than a vCPU's).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from sevmon.memory.ram import PAGE_SIZE, MemoryAccessError
from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState

_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Run:
    """``size`` bytes at guest-virtual ``va``, physically contiguous at ``gpa``, private (C-bit set) or shared."""

    va: int
    gpa: int
    size: int
    private: bool


def physical_runs(mem, cpu: CpuState, va: int, length: int, me_mask: int = 0, *,
                  root: int | None = None) -> list[Run]:
    """The runs ``[va, va + length)`` maps to, in virtual order; MemoryAccessError(first unmapped VA) otherwise."""
    if root is not None:
        cpu = dataclasses.replace(cpu, regs={**cpu.regs, "cr3": root})
    runs: list[Run] = []
    pos = 0
    while pos < length:
        a = (va + pos) & _U64
        n = min(length - pos, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
        t = paging.translate(mem, cpu, a, me_mask)
        if t is None:
            raise MemoryAccessError(a)
        gpa, private = t
        last = runs[-1] if runs else None
        if (last is not None and last.private == private and last.gpa + last.size == gpa
                and (last.va + last.size) & _U64 == a):
            runs[-1] = Run(last.va, last.gpa, last.size + n, private)
        else:
            runs.append(Run(a, gpa, n, private))
        pos += n
    return runs


def read_virtual(mem, cpu: CpuState, va: int, length: int, me_mask: int = 0, *, root: int | None = None) -> bytes:
    """``length`` bytes at guest-virtual ``va``: one ``mem.read`` per physical run."""
    runs = physical_runs(mem, cpu, va, length, me_mask, root=root)
    if len(runs) == 1:
        return mem.read(runs[0].gpa, runs[0].size, private=runs[0].private)
    return b"".join(mem.read(r.gpa, r.size, private=r.private) for r in runs)


def write_virtual(mem, cpu: CpuState, va: int, data: bytes, me_mask: int = 0, *, root: int | None = None) -> None:
    """Write ``data`` at guest-virtual ``va``: every page translated first, then one ``mem.write`` per run.

    Each run's write is all-or-nothing (``SevVm.dbg_encrypt``); if a later run fails, the earlier ones get back what
    they held (read before writing, only when there is more than one run), so a failed write leaves the guest as
    it was."""
    runs = physical_runs(mem, cpu, va, len(data), me_mask, root=root)
    done, pos = [], 0
    try:
        for r in runs:
            old = mem.read(r.gpa, r.size, private=r.private) if len(runs) > 1 else b""
            mem.write(r.gpa, data[pos:pos + r.size], private=r.private)
            done.append((r, old))
            pos += r.size
    except MemoryAccessError:
        for r, old in reversed(done):
            with contextlib.suppress(MemoryAccessError):
                mem.write(r.gpa, old, private=r.private)
        raise
