"""sevmon's own ELF note in the dumps of SEV guests: where the C-bit is; and the C-bit in the tables a dump carries.

An SEV guest writes its page tables with the C-bit set in CR3 and in every private entry. Kernel tools read a dump's
tables as addresses: ``crash`` masks the bit (VMCOREINFO's ``NUMBER(sme_mask)``), ``drgn`` does not and fails. So
sevmon's dump of an SEV guest clears the C-bit in the present entries of every table reachable from a known CR3 and
from the Linux kernel's own root (:func:`cbit_tables`, :func:`strip_cbit`); the registers in the vCPU notes stay as
they are. The dump then names the C-bit in one extra note, name ``SEVMON``, type ``NT_SEVMON_CBIT``, whose
descriptor is the C-bit position as a little-endian u32; the loader strips that bit from CR3 and every reachable
entry when it opens such a dump (tables that no root reaches, a process's own, may still carry it), so the image is a
plain guest again (``--sev`` then sets the C-bit of the new launch). QEMU's tools skip notes whose name they do not
know; plain guests' dumps have no such note and their tables are untouched.
"""

from __future__ import annotations

import struct

NOTE_NAME = "SEVMON"
NT_SEVMON_CBIT = 0x53455601  # "SEV" + 1


def cbit_note(cbitpos: int) -> bytes:
    """The whole note (header, padded name, descriptor), to append to the PT_NOTE payload."""
    name = NOTE_NAME.encode() + b"\0"
    desc = struct.pack("<I", cbitpos)
    return (struct.pack("<III", len(name), len(desc), NT_SEVMON_CBIT) + name + b"\0" * (-len(name) % 4)
            + desc)


def parse_cbit_note(desc: bytes) -> int:
    """The C-bit position from the note's descriptor; ValueError if it cannot be one."""
    if len(desc) < 4:
        raise ValueError(f"{NOTE_NAME} note of {len(desc)} bytes is too short")
    cbitpos = struct.unpack_from("<I", desc)[0]
    if not 12 <= cbitpos <= 51:
        raise ValueError(f"{NOTE_NAME} note gives C-bit position {cbitpos}, outside the address bits 12..51")
    return cbitpos


# -- the C-bit in the page tables a dump carries ------------------------------------------------------------------
def cbit_tables(read_frames, cpus, cbitpos: int) -> dict[int, tuple[int, int]]:
    """The page-table pages reachable from each of ``cpus``' CR3 (64-bit entries only), as
    ``{pfn: (byte offset, entry count)}``, read level by level through ``read_frames(pfns)`` (the debug path: one
    batched request per level).

    Why: a Linux SEV guest sets the C-bit in every present entry of its tables (``_PAGE_ENC``). ``crash`` masks it
    (VMCOREINFO's ``NUMBER(sme_mask)``), but ``drgn`` reads it as an address bit and every translation of a kernel
    address fails ("could not find physical memory segment: 0x8000..."); so sevmon's dump clears it in these
    tables (:func:`strip_cbit`), as sevmon's own loader does when it reopens a dump, and names it in the
    ``SEVMON`` note. Large leaves end the descent; tables that are not RAM are passed over.
    """
    from sevmon.x86.modes import mode_of
    from sevmon.x86.pte import PG_ADDRESS_MASK, PG_PRESENT, PG_PSE

    cbit = 1 << cbitpos
    found: dict[int, tuple[int, int]] = {}
    for cpu in cpus:
        mode = mode_of(cpu)
        if mode is None or not mode.wide:
            continue
        cr3 = cpu.cr3 & ~cbit
        if mode.long_mode:
            frontier = {(cr3 & PG_ADDRESS_MASK) >> 12: (0, 512)}
        else:  # PAE: the 32-byte PDPT
            frontier = {(cr3 & 0xFFFFFFE0) >> 12: ((cr3 & 0xFE0), mode.levels[0].entries)}
        for depth, level in enumerate(mode.levels):
            frontier = {p: v for p, v in frontier.items() if found.get(p) != v}
            if not frontier:
                break
            pages = read_frames(sorted(frontier))
            nxt: dict[int, tuple[int, int]] = {}
            for pfn, (offset, count) in frontier.items():
                page = pages.get(pfn)
                if page is None:
                    continue
                found[pfn] = (offset, count)
                if depth == len(mode.levels) - 1:
                    continue
                for e in struct.unpack_from(f"<{count}Q", page, offset):
                    if e & PG_PRESENT and not (e & PG_PSE and level.large_leaf):
                        nxt[((e & ~cbit) & PG_ADDRESS_MASK) >> 12] = (0, 512)
            frontier = nxt
    return found


def strip_cbit(page: bytes, offset: int, count: int, cbitpos: int) -> bytes:
    """``page`` with the C-bit cleared in its present entries ``[offset, offset + 8 * count)``."""
    cbit = 1 << cbitpos
    entries = struct.unpack_from(f"<{count}Q", page, offset)
    if not any(e & 1 and e & cbit for e in entries):
        return page
    out = bytearray(page)
    struct.pack_into(f"<{count}Q", out, offset, *(e & ~cbit if e & 1 else e for e in entries))
    return bytes(out)
