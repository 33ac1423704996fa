"""GDB Remote Serial Protocol framing: ``$payload#cs``, acks, Ctrl-C, binary escapes.

The reader is an incremental state machine fed whatever bytes arrived, so a packet cut
anywhere (mid-payload, mid-checksum, a client that vanishes) simply waits for more, and a
bad checksum or an oversized packet costs the client a ``-`` (retransmit) and nothing
else. Replies are never run-length encoded: ``*`` in a binary reply is escaped like ``$``,
``#`` and ``}`` (gdb's reader treats a raw ``*`` as RLE in every packet).
"""

from __future__ import annotations

from dataclasses import dataclass

#: What qSupported advertises as PacketSize (QEMU's MAX_PACKET_LENGTH): the largest payload gdb sends us.
PACKET_SIZE = 4096
INTERRUPT = 0x03
E_FAULT, E_INVAL = "E14", "E22"        # QEMU's error replies: EFAULT for memory, EINVAL for arguments
_ESCAPED = frozenset(b"$#}*")


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary-data escaping: ``}`` then the byte XOR 0x20 for ``$ # } *``."""
    if not _ESCAPED.intersection(data):
        return data
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo binary escaping (the data of an ``X`` packet)."""
    if b"}" not in data:
        return data
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("escape at the end of the data")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes | str) -> bytes:
    """``$payload#cs`` for a payload that is already escaped where it needs to be."""
    if isinstance(payload, str):
        payload = payload.encode()
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


@dataclass(frozen=True)
class Packet:
    payload: bytes


@dataclass(frozen=True)
class Interrupt:
    """Ctrl-C (0x03) outside a packet: gdb asks the target to stop."""


@dataclass(frozen=True)
class Nack:
    """A packet arrived damaged (bad checksum, oversized): answer ``-`` so gdb resends it."""
    reason: str


class PacketReader:
    """Feed bytes, get events (:class:`Packet`, :class:`Interrupt`, :class:`Nack`).

    Acks (``+``/``-``) from gdb are swallowed: replies are sent once (gdb's retransmit of a
    request gets a fresh reply). Bytes between packets that mean nothing are ignored, as
    in QEMU's ``RS_IDLE`` state.
    """

    def __init__(self, max_payload: int = PACKET_SIZE):
        self.max_payload = max_payload
        self._state = "idle"          # idle | payload | cs1 | cs2
        self._buf = bytearray()
        self._cs = b""
        self._overflow = False

    def feed(self, data: bytes) -> list[Packet | Interrupt | Nack]:
        events: list[Packet | Interrupt | Nack] = []
        i, n = 0, len(data)
        while i < n:
            st = self._state
            if st == "idle":
                b = data[i]
                i += 1
                if b == INTERRUPT:
                    events.append(Interrupt())
                elif b == 0x24:  # '$'
                    self._state, self._overflow = "payload", False
                    self._buf.clear()
            elif st == "payload":
                end = data.find(b"#", i)
                chunk = data[i:] if end < 0 else data[i:end]
                if not self._overflow:
                    if len(self._buf) + len(chunk) > self.max_payload:
                        self._overflow = True
                        self._buf.clear()
                    else:
                        self._buf += chunk
                if end < 0:
                    return events
                i = end + 1
                self._state, self._cs = "cs1", b""
            else:
                self._cs += data[i:i + 1]
                i += 1
                if len(self._cs) == 2:
                    self._state = "idle"
                    events.append(self._finish())
                else:
                    self._state = "cs2"
        return events

    def _finish(self) -> Packet | Nack:
        if self._overflow:
            return Nack(f"packet longer than {self.max_payload} bytes")
        payload = bytes(self._buf)
        self._buf.clear()
        try:
            want = int(self._cs, 16)
        except ValueError:
            return Nack("checksum is not hex")
        if want != checksum(payload):
            return Nack("bad checksum")
        return Packet(payload)
