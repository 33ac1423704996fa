"""Who is at the other end of a loopback TCP connection: its owner's uid, from ``/proc/net/tcp`` and ``tcp6``.

A TCP port on 127.0.0.1 is open to every local user, and through the gdb stub's ``monitor`` they would run the whole
HMP table as the daemon's user. A UNIX socket keeps them out by its mode (0600); for TCP, Linux lists every socket
of the network namespace with the uid that created it. The peer's socket is the one whose local address is the
connection's remote address and whose remote address is the connection's local one.
"""

from __future__ import annotations

import ipaddress
import os

PROC_FILES = ("/proc/net/tcp", "/proc/net/tcp6")


def _addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (the kernel prints each 32-bit word of the address in host order) -> (127.0.0.1, 8080)."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    return _plain(ip), int(port, 16)


def _plain(ip):
    """An IPv4-mapped IPv6 address as the IPv4 address it maps, so both families compare."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def tcp_peer_uid(local: tuple, peer: tuple) -> int | None:
    """The uid owning the socket at ``peer`` connected to ``local`` (``getsockname()``/``getpeername()`` tuples),
    or None when no such socket is listed (another network namespace, or it is already gone)."""
    want_local = (_plain(ipaddress.ip_address(peer[0].split("%")[0])), peer[1])
    want_remote = (_plain(ipaddress.ip_address(local[0].split("%")[0])), local[1])
    for path in PROC_FILES:
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 8:
                        continue
                    if _addr(fields[1]) == want_local and _addr(fields[2]) == want_remote:
                        return int(fields[7])
        except OSError:
            continue
    return None


def allowed_uid(uid: int | None) -> bool:
    """The daemon's own user and root may connect; nobody else (and not an unknown owner)."""
    return uid is not None and uid in (0, os.geteuid())
