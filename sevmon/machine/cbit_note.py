"""sevmon's own ELF note in the dumps of SEV guests: where the C-bit is.

A plaintext dump of an SEV guest still has the C-bit set in CR3 and in every private page-table entry (the guest
wrote its tables that way; the dump keeps them as they are, and describes RAM a second time at the C-bit addresses
for tools that read the bit as an address bit: :mod:`sevmon.machine.dump`). Reopened without ``--sev`` those entries
point far past RAM and ``info mem`` is empty, with nothing to say why. So sevmon's dump of an SEV guest carries one
extra note, name ``SEVMON``, type ``NT_SEVMON_CBIT``, whose descriptor is the C-bit position as a little-endian u32;
the loader strips that bit from CR3 and every reachable entry when it opens such a dump, so the image is a plain
guest again (``--sev`` then sets the C-bit of the new launch). QEMU's tools skip notes whose name they do not know;
plain guests' dumps have no such note and stay byte-identical to QEMU's.
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
