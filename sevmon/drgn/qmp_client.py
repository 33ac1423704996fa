"""A small blocking QMP client: drgn calls its memory reader synchronously, thousands of times, so each read is
one request and one reply on a plain UNIX socket (no event loop per call).

Events that arrive between replies are handed to ``on_event`` as they are read; :meth:`QmpClient.poll_events`
reads the ones already waiting without blocking, so a caller can learn that the guest ran before it trusts what it
read earlier.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable


class QmpError(Exception):
    """An error reply (``desc`` is the sentence the daemon gave)."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class QmpConnectionError(Exception):
    """No QMP monitor at the socket, or the connection ended."""


class QmpClient:
    def __init__(self, path: str, *, on_event: Callable[[dict], None] | None = None, timeout: float = 600.0):
        self.on_event = on_event or (lambda msg: None)
        self._buf = b""
        self._id = 0
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except FileNotFoundError:
            raise QmpConnectionError(f"{path}: no such socket (is sevmon serve running with --qmp {path}?)") from None
        except OSError as e:
            raise QmpConnectionError(f"{path}: cannot connect: {e.strerror or e}") from None
        greeting = self._message()
        if "QMP" not in greeting:
            raise QmpConnectionError(f"{path}: not a QMP monitor (no QMP greeting)")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._sock.close()

    def _message(self) -> dict:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError as e:
                raise QmpConnectionError(f"the QMP connection failed: {e.strerror or e}") from None
            if not chunk:
                raise QmpConnectionError("the QMP connection was closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise QmpConnectionError("the QMP peer sent something that is not JSON") from None

    def execute(self, name: str, arguments: dict | None = None):
        """One command's ``return`` value; QmpError on an error reply. Events read meanwhile go to ``on_event``."""
        self._id += 1
        req = {"execute": name, "id": self._id}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._message()
            if "event" in msg:
                self.on_event(msg)
            elif msg.get("id") == self._id:
                if "error" in msg:
                    err = msg["error"]
                    raise QmpError(err.get("desc", ""), err.get("class", "GenericError"))
                return msg.get("return")

    def poll_events(self) -> None:
        """Hand every event already sent to ``on_event``, without waiting for more (one ``select`` when none)."""
        while True:
            if b"\n" not in self._buf:
                ready, _, _ = select.select([self._sock], [], [], 0)
                if not ready:
                    return
            msg = self._message()
            if "event" in msg:
                self.on_event(msg)
