"""Guest-physical layout of RAM backends, read from QEMU's flat view (``info mtree -f``).

QEMU's ``pc``/``q35`` boards split RAM around the PCI hole at a point that depends on the
board, the RAM size and ``max-ram-below-4g``; the flat view of address space "memory"
already says where each piece of a backend went, so sevmon reads it instead of
recomputing it. A flat-view line is ``START-END (prio P, KIND): REGION[ @OFFSET]``
(no ``@`` means offset 0); ``ram`` and ``rom`` lines whose region is a backend's id are
RAM of that backend (``rom`` there is RAM the chipset shadows read-only, still the same
pages). Everything else (MMIO, the BIOS ROM, unassigned) stays outside RAM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (.+?)(?: @([0-9a-f]+))?$")


@dataclass(frozen=True)
class RamRange:
    """``[gpa, gpa + size)`` is backend ``memdev`` at byte ``offset``."""

    gpa: int
    size: int
    memdev: str
    offset: int


def ram_ranges(flat_view_text: str, memdevs: set[str]) -> list[RamRange]:
    """The RAM ranges of the "memory" address space, ascending and merged where they touch."""
    out: list[RamRange] = []
    in_memory = False
    for line in flat_view_text.replace("\r\n", "\n").split("\n"):
        if line.startswith("FlatView #"):
            in_memory = False
            continue
        if line.startswith(" AS "):
            in_memory = in_memory or line.startswith(' AS "memory"')
            continue
        if not in_memory:
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        start, end, kind, name, off = m.groups()
        if kind not in ("ram", "rom") or name not in memdevs:
            continue
        gpa, size = int(start, 16), int(end, 16) - int(start, 16) + 1
        offset = int(off, 16) if off else 0
        last = out[-1] if out else None
        if (last is not None and last.memdev == name and last.gpa + last.size == gpa
                and last.offset + last.size == offset):
            out[-1] = RamRange(last.gpa, last.size + size, name, last.offset)
        else:
            out.append(RamRange(gpa, size, name, offset))
    return sorted(out, key=lambda r: r.gpa)
