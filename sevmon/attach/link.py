"""sevmon's link to QEMU's QMP monitor (qemu.qmp's QMPClient), held for sevmon's lifetime.

QEMU serves one client per monitor: sevmon takes it and serves everyone else. The link
knows QEMU's greeting version (sevmon's own greeting carries it), QEMU's PID (SO_PEERCRED
of the socket, for a memfd backend), relays QEMU's events in order, and lets the machine
thread make synchronous calls on the event loop (``call_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.qmp_client import ExecuteError

from sevmon.attach.errors import AttachError

log = logging.getLogger("sevmon.attach")

GREETING_TIMEOUT = 5.0
# qemu.qmp logs every failure itself; sevmon says each in one sentence of its own
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QemuLink:
    def __init__(self, path: str):
        self.path = path
        self.client = QMPClient("sevmon-attach")
        self.pid: int | None = None
        self.version: dict | None = None
        self.capabilities: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events = EventListener()
        self.on_event: Callable[[dict], None] | None = None
        self.closed = asyncio.Event()   # QEMU closed the monitor (quit) or the socket was lost
        self.detach = asyncio.Event()   # sevmon was told to stop (a signal): QEMU keeps running
        self._pump: asyncio.Task | None = None

    # -- connecting ------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and negotiate, or raise AttachError with one sentence."""
        self.loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AttachError(f"{self.path}: no such socket (start QEMU with -qmp unix:{self.path},"
                              "server=on,wait=off)") from None
        except PermissionError:
            sock.close()
            raise AttachError(f"{self.path}: no permission to connect to QEMU's monitor") from None
        except OSError as e:
            sock.close()
            raise AttachError(f"{self.path}: cannot connect to QEMU's monitor: {e.strerror}") from None
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        self.pid = pid or None
        self.client.register_listener(self.events)
        try:
            await asyncio.wait_for(self.client.connect(sock), GREETING_TIMEOUT)
        except TimeoutError:
            sock.close()
            raise AttachError(f"{self.path}: no QMP greeting within {GREETING_TIMEOUT:g} s: QEMU serves one "
                              "client per monitor and another client probably holds this one") from None
        except (EOFError, ConnectionError):
            sock.close()
            raise AttachError(f"{self.path}: the monitor closed the connection before any QMP greeting") from None
        except Exception:
            sock.close()
            raise AttachError(f"{self.path}: no QMP greeting: this socket does not speak QMP (QEMU's -qmp, "
                              "not -monitor)") from None
        greeting = self.client.greeting
        self.version = greeting._asdict()["QMP"]["version"] if greeting is not None else None
        if self.version is None:
            self.version = await self.client.execute("query-version")
        self.capabilities = list(greeting.QMP.capabilities) if greeting is not None else []
        self._pump = asyncio.create_task(self._event_pump())

    async def _event_pump(self) -> None:
        """Relay QEMU's events until the link closes; then say so (``closed``)."""
        waiter = asyncio.create_task(self.client.runstate_changed())
        try:
            while True:
                get = asyncio.create_task(self.events.get())
                done, _ = await asyncio.wait({get, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    self._deliver(get.result())
                else:
                    get.cancel()
                    if self.client.runstate.name != "RUNNING":
                        self.drain()
                        break
                    waiter = asyncio.create_task(self.client.runstate_changed())
        finally:
            waiter.cancel()
            self.closed.set()

    def drain(self) -> None:
        """Deliver every event QEMU sent before the reply just received (events and
        replies arrive in order on the one socket; this keeps them in order for sevmon)."""
        while not self.events.empty():
            self._deliver(self.events._queue.get_nowait())

    def _deliver(self, event) -> None:
        if self.on_event is not None:
            self.on_event(dict(event))

    async def disconnect(self) -> None:
        """Release QEMU's monitor; a link QEMU already dropped reports its EOF here, quietly."""
        if self._pump is not None:
            self._pump.cancel()
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    # -- calls -----------------------------------------------------------------------
    async def raw(self, msg: dict) -> dict:
        """Send one QMP message (an id is assigned) and return QEMU's whole reply, errors included."""
        reply = await self.client._raw(msg)
        return dict(reply)

    async def execute(self, name: str, arguments: dict | None = None):
        try:
            return await self.client.execute(name, arguments)
        except ExecuteError as e:
            raise AttachError(f"QEMU: {name}: {e}") from None

    async def hmp(self, line: str, cpu_index: int | None = None) -> str:
        """One HMP line through QEMU's human-monitor-command; ``\\n`` line ends."""
        args: dict = {"command-line": line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        out = await self.execute("human-monitor-command", args)
        return out.replace("\r\n", "\n")

    def call_sync(self, coro):
        """Run ``coro`` on the event loop from the machine thread and wait for it."""
        if self.loop is None or threading.get_ident() == getattr(self.loop, "_thread_id", None):
            coro.close()
            raise RuntimeError("call_sync must not run on the event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
