"""The gdb stub's listening socket: QEMU's ``-gdb`` device syntax, one gdb at a time.

``tcp:HOST:PORT`` (``tcp::PORT`` binds 127.0.0.1, not every interface as QEMU does: the
stub hands out plaintext), ``unix:PATH`` (mode 0600, like the monitor sockets), ``none``.
QEMU's chardev options after a comma (``,server=on,wait=off``) are accepted and ignored:
the stub is always a server that does not wait. A second gdb while one is attached is
accepted and closed at once (gdb: "Remote connection closed"), leaving the first alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

from sevmon.debug.refusal import machine_refusal
from sevmon.gdb.peer import allowed_uid, tcp_peer_uid
from sevmon.gdb.session import GdbSession
from sevmon.unixsock import SocketInUse, listen_unix

log = logging.getLogger("sevmon.gdb")

DEFAULT_DEVICE = "tcp::1234"


class DeviceError(Exception):
    """The device cannot be opened: one sentence (HMP prints QEMU's own line instead)."""


@dataclass(frozen=True)
class Device:
    kind: str        # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""


def parse_device(text: str) -> Device:
    spec = text.split(",", 1)[0]
    if spec.startswith("tcp:"):
        host, sep, port = spec[4:].rpartition(":")
        if sep and port.isdigit() and int(port) > 65535:
            raise DeviceError(f"{text}: port {int(port)} is out of range (accepted: 0..65535)")
        if not sep or not port.isdigit():
            raise DeviceError(f"{text}: expected tcp:[HOST]:PORT, PORT 0..65535")
        return Device("tcp", host.strip("[]") or "127.0.0.1", int(port))
    if spec.startswith("unix:") and len(spec) > 5:
        return Device("unix", path=spec[5:])
    raise DeviceError(f"{text}: expected tcp:[HOST]:PORT (PORT 0..65535), unix:PATH or none")


class GdbServer:
    """Owns the listening socket and the one active session."""

    def __init__(self, runner, monitor):
        self.runner = runner              # the machine thread every front end shares
        self.machine = runner.machine
        self.monitor = monitor            # the HumanMonitor: qRcmd runs its lines
        self.loop = asyncio.get_running_loop()
        self.device: str | None = None
        self.address = ""                 # where it listens, e.g. tcp:127.0.0.1:1234
        self._server: asyncio.base_events.Server | None = None
        self._path: str | None = None
        self._session: GdbSession | None = None
        self._task: asyncio.Task | None = None

    async def start(self, text: str) -> None:
        """Listen on ``text``, then drop the previous device (as QEMU does: a device that
        cannot be opened leaves the old one in place); ``none`` stops the stub."""
        if text == "none":
            await self.stop()
            return
        dev = parse_device(text)
        path = None
        try:
            if dev.kind == "unix":
                sock = listen_unix(dev.path)
                server = await asyncio.start_unix_server(self._client, sock=sock)
                path, address = dev.path, f"unix:{dev.path}"
            else:
                server = await asyncio.start_server(self._client, dev.host, dev.port,
                                                    family=socket.AF_UNSPEC, reuse_address=True)
                host, port = server.sockets[0].getsockname()[:2]
                address = f"tcp:{host}:{port}"
        except SocketInUse as e:
            raise DeviceError(str(e)) from None
        except OSError as e:
            raise DeviceError(f"cannot listen on {text}: {e.strerror or e}") from None
        await self.stop()
        self._server, self._path, self.device, self.address = server, path, text, address
        log.info("gdb stub listening on %s", self.address)
        if dev.kind == "tcp" and self.machine.sev is not None and machine_refusal(self.machine) is None:
            log.warning("gdb stub on %s: the SEV guest's policy allows debugging, so every process of uid %d "
                        "(and root) can now read its plaintext through this port; other users are refused",
                        self.address, os.geteuid())

    @staticmethod
    def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
        """A TCP peer must belong to the daemon's user or root (:mod:`sevmon.gdb.peer`); one log line otherwise.
        UNIX sockets are kept private by their mode (0600) and need no look-up."""
        sock = writer.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        local, peer = sock.getsockname(), sock.getpeername()
        uid = tcp_peer_uid(local, peer)
        if allowed_uid(uid):
            return True
        who = f"uid {uid}" if uid is not None else "an owner /proc/net/tcp does not list"
        log.warning("gdb stub: refused a connection from %s:%s (%s): only uid %d and root may debug this guest",
                    peer[0], peer[1], who, os.geteuid())
        return False

    def start_from_machine_thread(self, text: str, timeout: float = 10) -> None:
        """For HMP ``gdbserver``: handlers run on the machine thread, sockets live on the loop."""
        asyncio.run_coroutine_threadsafe(self.start(text), self.loop).result(timeout)

    async def stop(self, exiting: bool = False) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None
        if self._session is not None:
            self._session.end(exited=exiting)
        self.device = None
        self.address = ""

    async def close(self) -> None:
        """The daemon is exiting: a gdb waiting in ``continue`` hears that the target exited."""
        await self.stop(exiting=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 1)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_allowed(writer):
            writer.close()
            return
        if self._session is not None and self._session.attached:
            log.info("gdb stub: refused a second connection (one gdb at a time)")
            writer.close()
            return
        session = GdbSession(self, reader, writer)
        self._session = session
        self._task = asyncio.current_task()
        try:
            await session.run()
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not take the daemon down
            log.exception("gdb session failed")
        finally:
            if self._session is session:
                self._session = None
                self._task = None
