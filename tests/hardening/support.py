"""Helpers of the hardening suite: wire-format checks, /proc probes, a watcher client.

Everything here judges what a user of the daemon sees: bytes on the socket, whether the
process is alive, how many file descriptors and how much memory it holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from tests.conftest import FIXTURES, Daemon, RawClient

ERROR_CLASSES = {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"}
NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
PROMPT = b"(qemu) "


# --------------------------------------------------------------------------- wire checks

# QEMU prints non-finite doubles with printf("%.17g"): inf, -inf, nan, -nan. Those are the
# only bare words QEMU's writer can produce besides true/false/null; Python's json module
# spells them Infinity/NaN, which QEMU never writes (and which must therefore be rejected).
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|-?(?:inf|nan)\b|NaN|-?Infinity')


def _qemu_words_to_python(raw: bytes) -> bytes:
    def sub(m: re.Match[bytes]) -> bytes:
        tok = m.group()
        if tok.startswith(b'"'):
            return tok
        if tok in (b"NaN", b"Infinity", b"-Infinity"):
            raise AssertionError(f"non-QEMU literal {tok!r} in {raw[:200]!r}")
        return {b"inf": b"Infinity", b"-inf": b"-Infinity", b"nan": b"NaN", b"-nan": b"NaN"}[tok]
    return _TOKENS.sub(sub, raw)


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
    return dict(pairs)


def parse_line(raw: bytes) -> object:
    """One server line (without its CRLF) as QEMU's writer would produce it, parsed."""
    assert raw.isascii(), f"non-ASCII output: {raw[:200]!r}"
    assert b"\r" not in raw and b"\n" not in raw, f"bare CR/LF inside a message: {raw[:200]!r}"
    return json.loads(_qemu_words_to_python(raw), object_pairs_hook=_no_duplicate_keys)


def check_message(msg: object) -> dict:
    """Assert ``msg`` is a greeting, an event, a return or a QEMU-shaped error."""
    assert isinstance(msg, dict), f"a message that is not an object: {msg!r}"
    keys = set(msg)
    if "QMP" in keys:
        assert keys == {"QMP"}, msg
        g = msg["QMP"]
        assert set(g) == {"version", "capabilities"}, msg
        assert set(g["version"]) == {"qemu", "package"}, msg
        assert set(g["version"]["qemu"]) == {"major", "minor", "micro"}, msg
        assert set(g["capabilities"]) <= {"oob"}, msg
    elif "event" in keys:
        assert {"event", "timestamp"} <= keys <= {"event", "timestamp", "data"}, msg
        assert isinstance(msg["event"], str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", msg["event"]), msg
        ts = msg["timestamp"]
        assert set(ts) == {"seconds", "microseconds"}, msg
        assert isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 1_000_000, msg
        if "data" in msg:
            assert isinstance(msg["data"], dict), msg
    elif "return" in keys:
        assert keys <= {"return", "id"}, msg
    elif "error" in keys:
        assert keys <= {"error", "id"}, msg
        e = msg["error"]
        assert isinstance(e, dict) and set(e) == {"class", "desc"}, msg
        assert e["class"] in ERROR_CLASSES, msg
        assert isinstance(e["desc"], str), msg
    else:
        raise AssertionError(f"not a QMP message: {msg!r}")
    return msg


class CheckedClient(RawClient):
    """A RawClient that validates every line it receives (the greeting included).

    Lines are found in linear time (replies of tens of MiB are part of the tests)."""

    def __init__(self, path: str, timeout: float = 30):
        self.seen = 0
        self._msg: object = None
        super().__init__(path, timeout)
        assert "QMP" in self.greeting, self.greeting

    # The unread bytes live in _data[_pos:]; ``buf`` keeps RawClient's interface.
    @property
    def buf(self) -> bytes:
        return bytes(self._data[self._pos:])

    @buf.setter
    def buf(self, value: bytes) -> None:
        self._data, self._pos = bytearray(value), 0

    def recv_line(self) -> bytes:
        start = self._pos
        while (i := self._data.find(b"\r\n", start)) < 0:
            if self._pos:  # drop what was consumed before growing
                del self._data[:self._pos]
                self._pos = 0
            start = max(0, len(self._data) - 1)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self._data += chunk
        line = bytes(self._data[self._pos:i])
        self._pos = i + 2
        self._msg = check_message(parse_line(line))
        assert self.seen == 0 or "QMP" not in self._msg, f"a second greeting: {line!r}"
        self.seen += 1
        return line

    def recv(self, events: bool = False) -> dict:
        while True:
            self.recv_line()
            msg = self._msg
            if events or "event" not in msg:
                return msg


def recv_until_eof(sock: socket.socket, timeout: float = 15) -> bytes:
    """Everything the peer sends until it closes (fails on a timeout)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def split_lines(data: bytes) -> list[dict]:
    """Whole messages in ``data``; it must end on a message boundary (no torn message)."""
    assert data == b"" or data.endswith(b"\r\n"), f"torn message at the end: {data[-200:]!r}"
    return [check_message(parse_line(line)) for line in data.split(b"\r\n")[:-1]]


# --------------------------------------------------------------------------- /proc probes

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def wait_fds_at_most(pid: int, limit: int, timeout: float = 15) -> int:
    """Poll until the daemon holds at most ``limit`` fds (closing is asynchronous)."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n > limit and time.monotonic() < deadline:
        time.sleep(0.05)
        n = fd_count(pid)
    return n


def alive(d: Daemon) -> bool:
    return d.proc.poll() is None


def log_mark(d: Daemon) -> int:
    """The current length of the daemon's log (for ``no_tracebacks(d, since=...)``)."""
    return len(d.output())


def no_tracebacks(d: Daemon, since: int = 0) -> None:
    """The daemon logged no exception (an internal error) since the mark ``since``."""
    out = d.output()[since:]
    if "Traceback" in out or "internal error" in out:
        records = [ln for ln in out.splitlines() if ln.startswith("sevmon:") or (ln and not ln[0].isspace()
                                                                                and "Error" in ln)]
        summary = "\n".join(dict.fromkeys(records))  # unique, in order
        raise AssertionError(f"the daemon logged internal errors:\n{summary[-6000:]}")


# --------------------------------------------------------------------------- watcher

class Watcher:
    """A well-behaved, negotiated client that stays connected and checks every reply."""

    def __init__(self, path: str):
        self.c = CheckedClient(path, timeout=10)
        self.c.negotiate()
        self.n = 0
        self.kvm = self.c.cmd("query-kvm", id="kvm-0")["return"]
        assert set(self.kvm) == {"enabled", "present"}

    def ping(self) -> float:
        """query-kvm with a fresh id; the exact reply; returns the round-trip time."""
        self.n += 1
        rid = ["watch", self.n]
        t0 = time.monotonic()
        r = self.c.cmd("query-kvm", id=rid)
        dt = time.monotonic() - t0
        assert r == {"return": self.kvm, "id": rid}
        return dt

    def close(self) -> None:
        self.c.close()


def transcript_sends() -> list[bytes]:
    """Every distinct request QEMU 7.2 answered in the recorded transcripts."""
    out: dict[bytes, None] = {}
    for path in sorted(FIXTURES.glob("*/qmp-transcript.json")):
        for entry in json.loads(path.read_text()):
            if "send" in entry:
                out[entry["send"].encode()] = None
    return list(out)


def transcript_entries() -> list[tuple[bytes, list]]:
    """(send, QEMU's replies) after negotiation, from the first transcript, in order."""
    path = sorted(FIXTURES.glob("*/qmp-transcript.json"))[0]
    entries = [e for e in json.loads(path.read_text()) if "send" in e]
    return [(e["send"].encode(), e["recv"]) for e in entries]
