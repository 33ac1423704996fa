"""UNIX listening sockets the way a monitor should make them.

Mode 0600 from the start (bound under a restrictive umask, so there is no window in
which another user could connect); a path held by a live server is refused; a stale
socket file left by a dead server is replaced; a path that is not a socket is never
removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


class SocketInUse(Exception):
    """One clear sentence for the user (the caller exits with status 1)."""


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"cannot listen on {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SocketInUse(f"cannot listen on {path}: {e.strerror}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: nobody listens
        else:
            raise SocketInUse(f"cannot listen on {path}: another server is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SocketInUse(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
