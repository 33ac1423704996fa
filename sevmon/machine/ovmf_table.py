"""OVMF's GUIDed footer table, parsed where QEMU parses it (hw/i386/pc_sysfw_ovmf.c).

OVMF ends its code volume with a table that tells the VMM where SEV-relevant things are.
The footer GUID sits 48 bytes before the end of the flash (the table, then 32 bytes for
the reset vector); just before it a u16 gives the table's total length including the
footer's 18 bytes. Entries are read *backwards* from the footer, each
``data || u16 len || GUID`` with ``len`` counting all three. For a legacy SEV (not ES)
guest QEMU only parses it: the measured data is the flash content, whatever the table says.
What sevmon uses it for, as QEMU 7.2 does: the secret area (``sev-inject-launch-secret``
without ``gpa``) and, for an SEV-ES guest, the reset block: the first u32 of its data is where the APs start
(``sevmon.machine.launch.es_vmsas``). The kernel-hashes table is listed but unused (no ``-kernel``).
"""

from __future__ import annotations

import logging
import struct
import uuid

log = logging.getLogger("sevmon")

FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_INFO_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"    # SEV-ES reset vector block
SEV_SECRET_GUID = "4c2eb361-7d9b-4cc3-8081-127c90d3d294"        # {u32 base; u32 size} secret area
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"  # kernel/initrd/cmdline hashes
BYTES_AFTER_FOOTER = 32
PAGE_SIZE = 4096

NAMES = {SEV_INFO_BLOCK_GUID: "sev-es-reset-block", SEV_SECRET_GUID: "sev-secret-area",
         SEV_HASH_TABLE_RV_GUID: "sev-hash-table"}


def parse_ovmf_table(flash: bytes) -> dict[str, bytes]:
    """``{guid: data}`` of the table at the end of pflash unit 0; ``{}`` if there is none.

    Same rules as QEMU's ``pc_system_parse_ovmf_flash``: a flash smaller than a page or
    without the footer GUID is silently not OVMF; an impossible length is reported
    ("OVMF table has invalid size N") and the table ignored, never fatal.
    """
    if len(flash) < PAGE_SIZE:
        return {}
    at = len(flash) - (BYTES_AFTER_FOOTER + 16)
    if flash[at:at + 16] != uuid.UUID(FOOTER_GUID).bytes_le:
        return {}
    at -= 2
    tot_len = struct.unpack_from("<H", flash, at)[0] - 16 - 2
    if tot_len < 0 or tot_len > at:
        log.warning("OVMF table has invalid size %d", tot_len)
        return {}
    table = flash[at - tot_len:at]
    entries: dict[str, bytes] = {}
    end = len(table)
    while end >= 18:  # walk backwards: ... data || u16 len || GUID
        guid = str(uuid.UUID(bytes_le=bytes(table[end - 16:end])))
        length = struct.unpack_from("<H", table, end - 18)[0]
        if length < 18 or length > end:
            break  # QEMU's pc_system_ovmf_table_find stops at a malformed entry
        entries.setdefault(guid, bytes(table[end - length:end - 18]))
        end -= length
    return entries


def secret_area(table: dict[str, bytes]) -> tuple[int, int] | None:
    """(base, size) of the guest's launch-secret area, as OVMF advertises it, or None."""
    data = table.get(SEV_SECRET_GUID)
    if data is None or len(data) < 8:
        return None
    return struct.unpack_from("<II", data)
