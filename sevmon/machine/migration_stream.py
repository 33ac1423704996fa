"""sevmon's migration stream: an SEV guest's RAM and vCPU state, as SEND_* produced them.

Not QEMU's stream (a non-goal): a minimal, documented format of sevmon's own. After the
magic line ``SEVMON-MIGRATION 1\\n`` come records ``type (u8) || length (u32 LE) || payload``:

=====  ==========  ==========================================================================
type   name        payload
=====  ==========  ==========================================================================
0x01   HEADER      JSON ``{"ram-size": N, "cbitpos": N, "vcpus": N}``: the target must match
0x02   SEV-START   source PDH cert (2084) || SEND_START session (128) || guest policy (u32 LE)
0x03   PAGE        gpa (u64 LE) || packet header (52: flags, iv, HMAC under the TIK) ||
                   the 4096-byte page encrypted under the TEK. A gpa may come again (a page
                   the running guest dirtied): the last one wins
0x04   CPU         JSON ``[{"index": i, "regs": {"cr3": N, ...}}]``
0x05   END         total PAGE records (u64 LE)
=====  ==========  ==========================================================================

Only ciphertext under the transport key crosses: the stream never holds guest plaintext
nor the source's at-rest ciphertext. Over ``unix:`` the target answers on the same
socket with one line, ``OK`` or ``ERR <reason>`` (the return path), so a source whose
target refused the stream cancels the send (SEND_CANCEL) and runs on.
"""

from __future__ import annotations

import json
import struct

MAGIC = b"SEVMON-MIGRATION 1\n"
HEADER, SEV_START, PAGE, CPU, END = 1, 2, 3, 4, 5
MAX_RECORD = 1 << 20
PAGE_RECORD_LEN = 8 + 52 + 4096


class StreamError(Exception):
    """The stream is not a sevmon migration stream, or it ended early."""


def record(kind: int, payload: bytes) -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


def page_record(gpa: int, header: bytes, trans: bytes) -> bytes:
    return record(PAGE, struct.pack("<Q", gpa) + header + trans)


def json_record(kind: int, obj) -> bytes:
    return record(kind, json.dumps(obj).encode())


def read_exact(f, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise StreamError(f"the migration stream ended early ({len(data)} of {n} bytes of a record)")
        data += chunk
    return data


def read_magic(f) -> None:
    if read_exact(f, len(MAGIC)) != MAGIC:
        raise StreamError("not a sevmon migration stream (bad magic)")


def read_record(f) -> tuple[int, bytes]:
    kind, length = struct.unpack("<BI", read_exact(f, 5))
    if kind not in (HEADER, SEV_START, PAGE, CPU, END) or length > MAX_RECORD:
        raise StreamError(f"unknown migration record type {kind} (length {length})")
    if kind == PAGE and length != PAGE_RECORD_LEN:
        raise StreamError(f"a PAGE record of {length} bytes (expected {PAGE_RECORD_LEN})")
    return kind, read_exact(f, length)


def parse_page(payload: bytes) -> tuple[int, bytes, bytes]:
    return struct.unpack_from("<Q", payload)[0], payload[8:60], payload[60:]
